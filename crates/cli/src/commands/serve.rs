//! `fleetgate serve` and `fleetgate info`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleetgate_server::{Limits, ServerConfig};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Data directory (created on first start).
    #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "FLEETGATE_LISTEN", default_value = "127.0.0.1")]
    listen: IpAddr,
    /// MQTT over TLS port (the SDKs use 8883).
    #[arg(long, env = "FLEETGATE_MQTT_PORT", default_value_t = 8883)]
    mqtt_port: u16,
    /// HTTPS port for the service API (the SDKs use 443).
    #[arg(long, env = "FLEETGATE_HTTPS_PORT", default_value_t = 443)]
    https_port: u16,
    /// Host name or IP the server certificate covers; repeatable. The first is the global
    /// device endpoint and the name of the hub made on first start. Default: localhost,
    /// 127.0.0.1, ::1.
    #[arg(long = "hostname", env = "FLEETGATE_HOSTNAMES", value_delimiter = ',')]
    hostnames: Vec<String>,
    /// Host name of the hub created on first start (default: the first --hostname). Devices are
    /// told it as their assigned hub and dial it, so list it in --hostname too. A hub keeps its
    /// name: on a later start, a name that is not one of the instance's hubs is refused.
    #[arg(long, env = "FLEETGATE_HUB_HOSTNAME")]
    hub_hostname: Option<String>,
    /// How register requests are answered: `immediate` (final 200 at once) or `polling`
    /// (202, then the device polls the operation status).
    #[arg(long, default_value = "immediate", value_parser = ["immediate", "polling"])]
    registration_response: String,
    /// Registrations admitted per minute for the ID scope (Azure's default quota is 1000); over
    /// it devices get 429 and retry. 0 = no limit.
    #[arg(long, env = "FLEETGATE_DPS_REGISTRATIONS_PER_MINUTE", default_value_t = 0)]
    dps_registrations_per_minute: u32,
    /// Device connects admitted per second per hub; over it, CONNACK 3 and the SDKs retry. 0 = no limit.
    #[arg(long, env = "FLEETGATE_HUB_CONNECTS_PER_SECOND", default_value_t = 0)]
    hub_connects_per_second: u32,
    /// Device-to-cloud messages per second per hub; over it, acknowledgements slow down. 0 = no limit.
    #[arg(long, env = "FLEETGATE_HUB_MESSAGES_PER_SECOND", default_value_t = 0)]
    hub_messages_per_second: u32,
    /// Hours device-to-cloud messages are kept for monitor-events and replay (Azure's built-in
    /// endpoint: 24 by default, up to 168); older ones are dropped a segment at a time.
    #[arg(long, env = "FLEETGATE_EVENT_RETENTION_HOURS", default_value_t = 24,
          value_parser = clap::value_parser!(u64).range(1..=8760))]
    event_retention_hours: u64,
    /// The most the telemetry log keeps on disk (bytes, or with K/M/G/T, powers of 1024); the
    /// oldest segments are dropped first. Default: half of the free space at start (plus what
    /// the log holds), at least 256M and at most 1T.
    #[arg(long, env = "FLEETGATE_EVENT_RETENTION_BYTES", value_parser = parse_size)]
    event_retention_bytes: Option<u64>,
    /// Free space kept on the data directory's filesystem (bytes, or with K/M/G/T): below it
    /// telemetry is refused (no PUBACK; devices resend), below half of it registrations and
    /// other changes get 503. Default: 2% of the filesystem, at least 128M and at most 2G; 0
    /// turns it off.
    #[arg(long, env = "FLEETGATE_DISK_RESERVE_BYTES", value_parser = parse_size)]
    disk_reserve_bytes: Option<u64>,
    /// PEM certificate chain to serve instead of the generated one (reloaded when the file changes
    /// or on SIGHUP, without dropping connections).
    #[arg(long, env = "FLEETGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "FLEETGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Concurrent connections, both ports together. Lowered at start to what the file-descriptor
    /// limit allows after a reserve for the store (a tenth of the limit plus 256); the figure in
    /// effect is logged.
    #[arg(long, env = "FLEETGATE_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Concurrent connections from one source address (an IPv6 /64 counts as one); over it, new
    /// connections are closed at once. 0 = no cap. Loopback clients are exempt unless
    /// --cap-loopback-sources.
    #[arg(long, env = "FLEETGATE_MAX_CONNECTIONS_PER_SOURCE",
          default_value_t = Limits::default().max_connections_per_source)]
    max_connections_per_source: usize,
    /// Apply --max-connections-per-source to loopback clients too (off: local clients and a local
    /// TCP proxy, through which every device looks like one client, are not capped).
    #[arg(long, env = "FLEETGATE_CAP_LOOPBACK_SOURCES")]
    cap_loopback_sources: bool,
    /// Seconds a DPS MQTT session whose credentials were refused stays open after CONNACK (it is
    /// closed a second after its first 401 answer in any case).
    #[arg(long, env = "FLEETGATE_UNAUTHENTICATED_TIMEOUT_SECS",
          default_value_t = Limits::default().unauthenticated_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    unauthenticated_timeout_secs: u64,
    /// Seconds allowed for an HTTP request's headers, from the TLS handshake or the previous
    /// response: also how long an idle keep-alive connection stays open.
    #[arg(long, env = "FLEETGATE_HTTP_HEADER_TIMEOUT_SECS",
          default_value_t = Limits::default().http_header_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_header_timeout_secs: u64,
    /// Seconds allowed for an HTTP request's body, however slowly it arrives; later, 408 and the
    /// connection closes.
    #[arg(long, env = "FLEETGATE_HTTP_BODY_TIMEOUT_SECS",
          default_value_t = Limits::default().http_body_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_body_timeout_secs: u64,
    /// Seconds a write may wait for a peer that takes no data (it stopped reading); then the
    /// connection is closed.
    #[arg(long, env = "FLEETGATE_WRITE_TIMEOUT_SECS",
          default_value_t = Limits::default().write_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    write_timeout_secs: u64,
    /// MiB that MQTT packets still arriving may hold, all connections together; a connection that
    /// would exceed it is closed.
    #[arg(long, env = "FLEETGATE_PARTIAL_PACKET_BUDGET_MIB",
          default_value_t = (Limits::default().partial_packet_budget_bytes >> 20) as u64,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    partial_packet_budget_mib: u64,
    /// Seconds allowed for a large MQTT packet (over 2 KiB) to arrive once it has begun.
    #[arg(long, env = "FLEETGATE_PARTIAL_PACKET_TIMEOUT_SECS",
          default_value_t = Limits::default().partial_packet_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    partial_packet_timeout_secs: u64,
    /// Days the audit trail is kept; older entries are deleted (checked every 10 minutes).
    #[arg(long, env = "FLEETGATE_AUDIT_RETENTION_DAYS", default_value_t = 90,
          value_parser = clap::value_parser!(u64).range(1..=36500))]
    audit_retention_days: u64,
    /// Most audit entries kept (about 300 bytes each); the oldest are deleted first.
    #[arg(long, env = "FLEETGATE_AUDIT_MAX_ROWS", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1000..))]
    audit_max_rows: u64,
    /// Refused authentications from one address (an IPv6 /64) within --auth-failure-window-secs
    /// after which it is answered 429 / CONNACK 3 without a credential check for
    /// --auth-backoff-secs. 0 = never.
    #[arg(long, env = "FLEETGATE_AUTH_FAILURE_LIMIT", default_value_t = 100)]
    auth_failure_limit: u32,
    /// Refusals per source address and window recorded in full in the audit trail (and logged);
    /// the rest of the window's are counted into one summary entry.
    #[arg(long, env = "FLEETGATE_AUTH_FAILURES_RECORDED", default_value_t = 10)]
    auth_failures_recorded: u32,
    /// The window refusals are counted (and summarized) in, per source address.
    #[arg(long, env = "FLEETGATE_AUTH_FAILURE_WINDOW_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    auth_failure_window_secs: u64,
    /// How long a source over --auth-failure-limit is turned away.
    #[arg(long, env = "FLEETGATE_AUTH_BACKOFF_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    auth_backoff_secs: u64,
    /// Also serve /metrics over plain HTTP, without credentials, on ADDR:PORT (for a Prometheus on
    /// a private network). On the HTTPS port /metrics needs a DPS policy's SAS token with the
    /// ServiceConfig or RegistrationStatusRead right.
    #[arg(long, env = "FLEETGATE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log format.
    #[arg(long, env = "FLEETGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETGATE_LOG").unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let mut config = ServerConfig::new(args.data_dir);
    config.listen = args.listen;
    config.mqtt_port = args.mqtt_port;
    config.https_port = args.https_port;
    if !args.hostnames.is_empty() {
        config.hostnames = args.hostnames;
    }
    config.hub_hostname = args.hub_hostname;
    config.immediate_assignment = args.registration_response == "immediate";
    config.event_retention = std::time::Duration::from_secs(args.event_retention_hours * 3600);
    config.event_retention_bytes = args.event_retention_bytes;
    config.disk_reserve_bytes = args.disk_reserve_bytes;
    config.audit.retention = std::time::Duration::from_secs(args.audit_retention_days * 24 * 3600);
    config.audit.max_rows = args.audit_max_rows;
    config.audit.refusals.max_failures = args.auth_failure_limit;
    config.audit.refusals.recorded = args.auth_failures_recorded;
    config.audit.refusals.window = std::time::Duration::from_secs(args.auth_failure_window_secs);
    config.audit.refusals.backoff = std::time::Duration::from_secs(args.auth_backoff_secs);
    config.metrics_listen = args.metrics_listen;
    config.tls_cert = args.tls_cert;
    config.tls_key = args.tls_key;
    let secs = std::time::Duration::from_secs;
    let limits = &mut config.limits;
    limits.max_connections = usize::try_from(args.max_connections).unwrap_or(usize::MAX);
    limits.max_connections_per_source = args.max_connections_per_source;
    limits.cap_loopback_sources = args.cap_loopback_sources;
    limits.unauthenticated_timeout = secs(args.unauthenticated_timeout_secs);
    limits.http_header_timeout = secs(args.http_header_timeout_secs);
    limits.http_body_timeout = secs(args.http_body_timeout_secs);
    limits.write_timeout = secs(args.write_timeout_secs);
    limits.partial_packet_budget_bytes = usize::try_from(args.partial_packet_budget_mib << 20).unwrap_or(usize::MAX);
    limits.partial_packet_timeout = secs(args.partial_packet_timeout_secs);
    use fleetgate_core::throttle::Rate;
    let nonzero = |n: u32, f: fn(u32) -> Rate| (n > 0).then(|| f(n));
    config.registration_rate = nonzero(args.dps_registrations_per_minute, Rate::per_minute);
    config.hub.connect_rate = nonzero(args.hub_connects_per_second, Rate::per_second);
    config.hub.message_rate = nonzero(args.hub_messages_per_second, Rate::per_second);

    let (mqtt_port, https_port) = (args.mqtt_port, args.https_port);
    let server = match fleetgate_server::start(config).await {
        Ok(s) => s,
        Err(e) => {
            return Err(match privileged_port_hint(&e, mqtt_port, https_port) {
                Some(hint) => anyhow::anyhow!("starting fleetgate: {e}\nhint: {hint}"),
                None => anyhow::Error::new(e).context("starting fleetgate"),
            });
        }
    };
    let stopped = stop_signals();
    // The server runs on whether or not anyone reads its banner.
    let banner = crate::output::write_best_effort;
    banner(format_args!("{}\n", server.instance.banner()));
    banner(format_args!("  MQTT/TLS on {}, HTTPS on {}\n", server.mqtt_addr, server.https_addr));
    if let Some(addr) = server.metrics_addr {
        banner(format_args!("  /metrics over plain HTTP on {addr}\n"));
    }
    let stop = server.shutdown_signal();
    tokio::spawn(async move {
        stopped.await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    server.wait().await;
    Ok(())
}

/// What to do about a port the OS refused because only root may listen on it (EACCES on a
/// port below 1024); `None` for any other failure.
fn privileged_port_hint(e: &fleetgate_server::StartError, mqtt_port: u16, https_port: u16) -> Option<String> {
    let fleetgate_server::StartError::Bind { addr, error } = e else { return None };
    let port = addr.port();
    if error.kind() != std::io::ErrorKind::PermissionDenied || port == 0 || port >= 1024 {
        return None;
    }
    let flag = if port == https_port {
        "--https-port 8443"
    } else if port == mqtt_port {
        "--mqtt-port 18883"
    } else {
        "--metrics-listen with a port of 1024 or more"
    };
    Some(format!(
        "port {port} is below 1024: only root, or a binary given CAP_NET_BIND_SERVICE, may listen on \
         it; use another port, e.g. {flag}"
    ))
}

/// A size in bytes: a number, optionally followed by K, M, G or T (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("'{text}': the unit must be K, M, G or T")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{text}' is not a size (e.g. 500M, 20G, 1073741824)"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("'{text}' is too large"))
}

/// Ctrl-C or SIGTERM, with the handlers installed when called (not when first awaited): a stop
/// asked for as soon as the banner is out must not find the default action (death, exit code
/// of a signal) still in place.
#[cfg(unix)]
fn stop_signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

#[cfg(not(unix))]
fn stop_signals() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `fleetgate info`: the instance file's details, and whether a server answers for it (the
/// file stays after the server stops).
pub async fn info(data_dir: &Path) -> anyhow::Result<()> {
    let inst =
        fleetgate_server::Instance::read(data_dir).context("run `fleetgate serve` once to create the instance")?;
    let target = crate::Target { connection_string: None, data_dir: data_dir.to_owned(), ca_cert: None };
    let checked = match super::client(&target) {
        Ok(c) => match tokio::time::timeout(std::time::Duration::from_secs(10), c.healthz()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => match e.api_error() {
                Some(a) => Err(format!("/healthz answered {}: {}", a.status, a.body)),
                None => Err(e.detail()),
            },
            Err(_) => Err("no answer within 10 s".to_owned()),
        },
        Err(e) => Err(format!("{e:#}")),
    };
    match checked {
        Ok(()) => out!("Fleetgate is running (its /healthz answers).\n"),
        Err(why) => out!(
            "Fleetgate instance in {}; no server answers for it (start one with `fleetgate serve`).\n  Why: {why}\n",
            data_dir.display()
        ),
    }
    out!("{}", inst.details());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_size, privileged_port_hint};

    #[test]
    fn a_refused_low_port_is_printed_once_with_the_flag_to_change() {
        let bind = |port: u16, kind: std::io::ErrorKind| fleetgate_server::StartError::Bind {
            addr: std::net::SocketAddr::from(([0, 0, 0, 0], port)),
            error: std::io::Error::from(kind),
        };
        let denied = std::io::ErrorKind::PermissionDenied;
        assert!(privileged_port_hint(&bind(443, denied), 8883, 443).unwrap().contains("--https-port"));
        assert!(privileged_port_hint(&bind(883, denied), 883, 443).unwrap().contains("--mqtt-port"));
        assert!(privileged_port_hint(&bind(8443, denied), 8883, 8443).is_none());
        assert!(privileged_port_hint(&bind(443, std::io::ErrorKind::AddrInUse), 8883, 443).is_none());
        let printed = format!("{:#}", anyhow::Error::new(bind(443, denied)).context("starting fleetgate"));
        assert_eq!(printed.matches("permission denied").count(), 1, "{printed}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("20g"), Ok(20 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "G", "12X", "-1", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
