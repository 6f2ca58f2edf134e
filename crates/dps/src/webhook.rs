//! Calling a custom allocation webhook: one POST, bounded in time and size, every failure a
//! clear reason in the device's registration record.

use fleetgate_core::allocation::{parse_custom_allocation_response, CustomAllocationResult};
use fleetgate_core::enrollment::CustomAllocationDefinition;
use fleetgate_core::{AzureError, ErrorCode};
use serde_json::Value;

/// Largest answer read from a webhook.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

fn failed(why: impl Into<String>) -> AzureError {
    AzureError::new(ErrorCode::CustomAllocationFailed, why)
}

/// The URL as it may be logged: the query (Azure Functions put their key there) left out.
fn loggable(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

pub(crate) async fn call(
    http: &reqwest::Client,
    def: &CustomAllocationDefinition,
    request: &Value,
) -> Result<CustomAllocationResult, AzureError> {
    let url = &def.webhook_url;
    let resp = http.post(url).json(request).send().await.map_err(|e| {
        let why = if e.is_timeout() { "timed out".to_owned() } else { "could not be reached".to_owned() };
        tracing::warn!(webhook = %loggable(url), error = %e, "custom allocation webhook failed");
        failed(format!("The custom allocation webhook {why}."))
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(failed(format!("The custom allocation webhook answered HTTP {}.", status.as_u16())));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| failed(format!("The custom allocation webhook's answer could not be read: {e}.")))?;
    if body.len() > MAX_ANSWER_BYTES {
        return Err(failed("The custom allocation webhook's answer is larger than 64 KB."));
    }
    parse_custom_allocation_response(&body)
        .map_err(|why| failed(format!("The custom allocation webhook's answer is invalid: {why}.")))
}
