//! The result formats of `-o/--output`, as `az` (knack) renders them: pretty JSON, colored JSON,
//! an aligned table of the scalar fields, tab-separated values. Pure functions of the result, so
//! the rules are unit-tested here and only the printing is left to [`crate::output`].

use serde_json::{Map, Value};

/// `-o/--output`: how a command's result is printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Pretty-printed JSON (the default).
    #[default]
    Json,
    /// JSON colored for a terminal (plain JSON when stdout is not one, or NO_COLOR is set).
    Jsonc,
    /// A table of each object's scalar fields, one row per object.
    Table,
    /// Tab-separated values, one line per object: for scripts.
    Tsv,
}

/// Pretty JSON with a trailing newline.
pub fn json(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("a JSON value prints");
    s.push('\n');
    s
}

/// Pretty JSON with ANSI colors: keys blue, strings green, numbers cyan, true/false/null
/// magenta. The layout is the one [`json`] prints.
pub fn json_color(v: &Value) -> String {
    fn scalar(v: &Value) -> String {
        let text = serde_json::to_string(v).expect("a JSON value prints");
        let color = match v {
            Value::String(_) => "32",
            Value::Number(_) => "36",
            _ => "35",
        };
        format!("\x1b[{color}m{text}\x1b[0m")
    }
    fn walk(v: &Value, indent: usize, out: &mut String) {
        let pad = |n: usize| "  ".repeat(n);
        match v {
            Value::Array(items) if !items.is_empty() => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    out.push_str(&pad(indent + 1));
                    walk(item, indent + 1, out);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push(']');
            }
            Value::Object(fields) if !fields.is_empty() => {
                out.push_str("{\n");
                for (i, (k, item)) in fields.iter().enumerate() {
                    let key = serde_json::to_string(k).expect("a string prints");
                    out.push_str(&format!("{}\x1b[34m{key}\x1b[0m: ", pad(indent + 1)));
                    walk(item, indent + 1, out);
                    out.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push('}');
            }
            Value::Array(_) => out.push_str("[]"),
            Value::Object(_) => out.push_str("{}"),
            _ => out.push_str(&scalar(v)),
        }
    }
    let mut out = String::new();
    walk(v, 0, &mut out);
    out.push('\n');
    out
}

/// Keys a table leaves out, as az does: long or internal values nobody reads in a table.
const SKIP_KEYS: [&str; 3] = ["id", "type", "etag"];

/// az's `-o table`: one row per element of a list (a single object is one row); the columns are
/// the non-null scalar fields (keys sorted unless a `--query` chose them, their first letter
/// capitalized; `id`, `type` and `etag` left out), in order of first appearance; a header, a
/// line of dashes, columns two spaces apart. A list element that is a list gives columns
/// `Column1`..., a scalar a column `Result`. Nothing at all for an empty list; an error when no
/// row has a column (only nested values: ask for some with `--query`).
pub fn table(v: &Value, sort_keys: bool) -> Result<String, String> {
    let items: Vec<&Value> = match v {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    if items.is_empty() {
        return Ok(String::new());
    }
    let rows: Vec<Vec<(String, String)>> = items.iter().map(|item| table_row(item, sort_keys)).collect();
    let mut columns: Vec<String> = Vec::new();
    for (name, _) in rows.iter().flatten() {
        if !columns.contains(name) {
            columns.push(name.clone());
        }
    }
    if columns.is_empty() {
        return Err("table output unavailable: the result has no scalar fields; \
                    choose some with --query, or use -o json"
            .into());
    }
    let cells: Vec<Vec<&str>> = rows
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|c| row.iter().find(|(name, _)| name == c).map_or("", |(_, text)| text.as_str()))
                .collect()
        })
        .collect();
    let width =
        |i: usize| cells.iter().map(|r| r[i].chars().count()).chain([columns[i].chars().count()]).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns.len()).map(width).collect();
    let line = |texts: Vec<String>| {
        let padded: Vec<String> =
            texts.iter().zip(&widths).map(|(t, w)| format!("{t}{}", " ".repeat(w - t.chars().count()))).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(columns.clone());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in cells {
        out.push_str(&line(row.into_iter().map(str::to_owned).collect()));
    }
    Ok(out)
}

/// One table row as (column, text) pairs.
fn table_row(item: &Value, sort_keys: bool) -> Vec<(String, String)> {
    match item {
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            if sort_keys {
                keys.sort();
            }
            keys.into_iter()
                .filter(|k| !SKIP_KEYS.contains(&k.as_str()))
                .filter_map(|k| {
                    let v = &fields[k];
                    (!v.is_null() && !v.is_array() && !v.is_object()).then(|| (capitalize(k), python_str(v)))
                })
                .collect()
        }
        Value::Array(values) => {
            values.iter().enumerate().map(|(i, v)| (format!("Column{}", i + 1), python_str(v))).collect()
        }
        scalar => vec![("Result".to_owned(), python_str(scalar))],
    }
}

fn capitalize(k: &str) -> String {
    let mut chars = k.chars();
    chars.next().map(|first| first.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// A value as az's (Python's) `str()` writes it inside a row: `None`, `True`, `False`, strings
/// bare, nested values as JSON.
fn python_str(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        nested => nested.to_string(),
    }
}

/// az's `-o tsv`: a line per element of a list (a single value is one line). An object's values
/// in key order, tab-separated: a nested object as an empty field, a nested list as its length,
/// null as `None`; a list's elements the same way; a scalar line as is (`true`/`false` in lower
/// case).
pub fn tsv(v: &Value) -> String {
    let items: Vec<&Value> = match v {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let field = |v: &Value| match v {
        Value::Array(a) => a.len().to_string(),
        Value::Object(_) => String::new(),
        scalar => python_str(scalar),
    };
    let mut out = String::new();
    for item in items {
        let line = match item {
            Value::Object(fields) => sorted(fields).into_iter().map(|(_, v)| field(v)).collect::<Vec<_>>().join("\t"),
            Value::Array(values) => values.iter().map(field).collect::<Vec<_>>().join("\t"),
            Value::Bool(b) => b.to_string(),
            scalar => python_str(scalar),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn sorted(fields: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut pairs: Vec<_> = fields.iter().collect();
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_has_sorted_scalar_columns_a_header_and_dashes() {
        let v = json!([
            {"status": "enabled", "deviceId": "a", "etag": "x", "authentication": {"type": "sas"}, "cloudToDeviceMessageCount": 0},
            {"deviceId": "long-device", "status": null, "extra": true},
        ]);
        let t = table(&v, true).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "CloudToDeviceMessageCount  DeviceId     Status   Extra");
        assert_eq!(lines[1], "-------------------------  -----------  -------  -----");
        assert_eq!(lines[2], "0                          a            enabled");
        assert_eq!(lines[3], "                           long-device           True");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn table_keeps_a_query_s_column_order_and_handles_scalars_and_lists() {
        assert_eq!(table(&json!({"b": 1, "a": 2}), false).unwrap(), "B  A\n-  -\n1  2\n");
        assert_eq!(table(&json!(["x", "yy"]), true).unwrap(), "Result\n------\nx\nyy\n");
        assert_eq!(table(&json!([["a", 1]]), true).unwrap(), "Column1  Column2\n-------  -------\na        1\n");
        assert_eq!(table(&json!([]), true).unwrap(), "");
        assert!(table(&json!([{"nested": {"a": 1}}]), true).is_err());
    }

    #[test]
    fn tsv_lines_are_values_in_key_order() {
        let v = json!([{"b": "x", "a": null, "c": [1, 2], "d": {"e": 1}, "f": false}, "plain", true, ["p", 3]]);
        assert_eq!(tsv(&v), "None\tx\t2\t\tFalse\nplain\ntrue\np\t3\n");
        assert_eq!(tsv(&json!({"k": 1})), "1\n");
    }

    #[test]
    fn colored_json_is_the_pretty_json_plus_escapes() {
        let v = json!({"a": [1, "s", null, {}], "b": {"c": true}, "e": []});
        let colored = json_color(&v);
        assert!(colored.contains("\x1b[34m\"a\"\x1b[0m: ["));
        assert!(colored.contains("\x1b[32m\"s\"\x1b[0m"));
        let plain = colored.replace("\x1b[0m", "").replace("\x1b[32m", "").replace("\x1b[34m", "");
        let plain = plain.replace("\x1b[35m", "").replace("\x1b[36m", "");
        assert_eq!(plain, json(&v));
    }
}
