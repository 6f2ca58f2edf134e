//! `@file` values, as az takes them: an option value `@path` is the contents of that file, and
//! `@-` is standard input. Used as clap value parsers, so a missing file or bad JSON is a usage
//! error naming the file, before the command does anything.

use std::io::Read;

use serde_json::Value;

/// The text of a value: the value itself, or the file (stdin for `@-`) it names with `@`.
pub fn text(s: &str) -> Result<String, String> {
    match s.strip_prefix('@') {
        None => Ok(s.to_owned()),
        Some("-") => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| format!("reading standard input: {e}"))?;
            Ok(text)
        }
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}")),
    }
}

/// A JSON value given inline or as `@file` / `@-`.
pub fn json(s: &str) -> Result<Value, String> {
    let text = text(s)?;
    let source = match s.strip_prefix('@') {
        Some("-") => "standard input is".to_owned(),
        Some(path) => format!("{path} is"),
        None => "it is".to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| format!("{source} not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_file_and_missing_file() {
        assert_eq!(json(r#"{"a":1}"#).unwrap()["a"], 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(&path, r#"{"delay": 5}"#).unwrap();
        assert_eq!(json(&format!("@{}", path.display())).unwrap()["delay"], 5);
        let missing = dir.path().join("missing.json");
        let err = json(&format!("@{}", missing.display())).unwrap_err();
        assert!(err.contains("missing.json"), "{err}");
        std::fs::write(&path, "{not json").unwrap();
        let err = json(&format!("@{}", path.display())).unwrap_err();
        assert!(err.contains("p.json is not valid JSON"), "{err}");
        assert_eq!(text("plain").unwrap(), "plain");
    }
}
