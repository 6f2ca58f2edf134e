//! The SQL-like queries of Azure's service APIs, in the subset Fleetgate answers: `*` (what the
//! DPS service SDKs send by default), `SELECT * FROM <collection>`, and a `WHERE` clause of
//! comparisons (`=`, `!=`, `<>`) of a property path with a string, number, boolean or `null`,
//! joined by `AND`. Anything else (projections, `OR`, `GROUP BY`, functions, ranges…) is refused
//! with the reason, never ignored: a silently dropped condition would answer records the caller
//! did not ask for.
//!
//! Pure: [`parse`] takes any text and returns a [`Query`] or a [`QueryError`]; [`Query::matches`]
//! tests one JSON document (the record as the API answers it).

use serde_json::Value;

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The collection after `FROM`, lower-cased; `None` for `*`.
    pub collection: Option<String>,
    /// All must hold (`AND`).
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The property path, e.g. `["attestation", "type"]` for `attestation.type`.
    pub path: Vec<String>,
    pub equal: bool,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// The longest query text parsed (Azure's limit is far larger; a registry query is short).
pub const MAX_QUERY_CHARS: usize = 8192;
/// The most conditions in one `WHERE`.
pub const MAX_CONDITIONS: usize = 32;

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Num(serde_json::Number),
    Star,
    Op(&'static str),
}

fn err<T>(msg: impl Into<String>) -> Result<T, QueryError> {
    Err(QueryError(msg.into()))
}

fn tokenize(q: &str) -> Result<Vec<Token>, QueryError> {
    let mut out = Vec::new();
    let mut chars = q.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '*' {
            chars.next();
            out.push(Token::Star);
        } else if c == '=' {
            chars.next();
            out.push(Token::Op("="));
        } else if c == '!' || c == '<' {
            chars.next();
            match (c, chars.peek().map(|&(_, n)| n)) {
                ('!', Some('=')) | ('<', Some('>')) => {
                    chars.next();
                    out.push(Token::Op("!="));
                }
                _ => return err(format!("Unsupported operator at position {i}; only =, != and <> are supported.")),
            }
        } else if c == '\'' || c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    None => return err("Unterminated string literal."),
                    // A doubled quote is a quote, as in SQL.
                    Some((_, q)) if q == c => {
                        if chars.peek().is_some_and(|&(_, n)| n == c) {
                            chars.next();
                            s.push(c);
                        } else {
                            break;
                        }
                    }
                    Some((_, ch)) => s.push(ch),
                }
            }
            out.push(Token::Str(s));
        } else if c.is_ascii_digit() || c == '-' {
            let mut s = String::new();
            while let Some(&(_, n)) = chars.peek() {
                if n.is_ascii_alphanumeric() || n == '.' || n == '-' || n == '+' {
                    s.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            let n = serde_json::from_str::<serde_json::Number>(&s)
                .map_err(|_| QueryError(format!("'{s}' is not a number.")))?;
            out.push(Token::Num(n));
        } else if c.is_alphabetic() || c == '_' || c == '$' {
            let mut s = String::new();
            while let Some(&(_, n)) = chars.peek() {
                if n.is_alphanumeric() || n == '_' || n == '$' || n == '.' || n == '-' {
                    s.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(Token::Word(s));
        } else {
            return err(format!("Unsupported character '{c}' at position {i}."));
        }
    }
    Ok(out)
}

fn keyword(t: Option<&Token>, kw: &str) -> bool {
    matches!(t, Some(Token::Word(w)) if w.eq_ignore_ascii_case(kw))
}

const UNSUPPORTED_WORDS: &[&str] = &["or", "not", "in", "like", "between", "is", "group", "order", "top", "select"];

/// Parses a query. Keywords are case-insensitive; property names are compared as written.
pub fn parse(q: &str) -> Result<Query, QueryError> {
    if q.chars().count() > MAX_QUERY_CHARS {
        return err(format!("The query is longer than {MAX_QUERY_CHARS} characters."));
    }
    let toks = tokenize(q)?;
    if toks == [Token::Star] {
        return Ok(Query { collection: None, conditions: Vec::new() });
    }
    let mut it = toks.iter().peekable();
    if !keyword(it.next(), "select") {
        return err("The query must be '*' or start with SELECT.");
    }
    if it.next() != Some(&Token::Star) {
        return err("Only 'SELECT *' is supported (no projections or aggregates).");
    }
    if !keyword(it.next(), "from") {
        return err("Expected FROM after 'SELECT *'.");
    }
    let collection = match it.next() {
        Some(Token::Word(w)) if !w.contains('.') => w.to_ascii_lowercase(),
        _ => return err("Expected a collection name after FROM."),
    };
    let mut conditions = Vec::new();
    match it.next() {
        None => return Ok(Query { collection: Some(collection), conditions }),
        Some(t) if keyword(Some(t), "where") => {}
        Some(_) => return err("Only a WHERE clause may follow the collection."),
    }
    loop {
        let path = match it.next() {
            Some(Token::Word(w)) if !UNSUPPORTED_WORDS.iter().any(|k| w.eq_ignore_ascii_case(k)) => w,
            Some(Token::Word(w)) => return err(format!("'{w}' is not supported in a WHERE clause.")),
            _ => return err("Expected a property name in the WHERE clause."),
        };
        let path: Vec<String> = path.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return err("A property path has an empty name.");
        }
        let equal = match it.next() {
            Some(Token::Op("=")) => true,
            Some(Token::Op("!=")) => false,
            Some(Token::Word(w)) => return err(format!("'{w}' is not supported; only =, != and <> are.")),
            _ => return err("Expected =, != or <> after a property name."),
        };
        let value = match it.next() {
            Some(Token::Str(s)) => Value::String(s.clone()),
            Some(Token::Num(n)) => Value::Number(n.clone()),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("null") => Value::Null,
            _ => return err("Expected a string, number, true, false or null after the operator."),
        };
        conditions.push(Condition { path, equal, value });
        if conditions.len() > MAX_CONDITIONS {
            return err(format!("At most {MAX_CONDITIONS} conditions are supported."));
        }
        match it.next() {
            None => return Ok(Query { collection: Some(collection), conditions }),
            Some(t) if keyword(Some(t), "and") => {}
            Some(Token::Word(w)) => {
                return err(format!("'{w}' is not supported; conditions may only be joined by AND."))
            }
            Some(_) => return err("Expected AND or the end of the query after a condition."),
        }
    }
}

impl Query {
    /// Whether the query is for `collection` (compared case-insensitively); `*` is for any.
    pub fn is_for(&self, collection: &str) -> bool {
        self.collection.as_deref().is_none_or(|c| c.eq_ignore_ascii_case(collection))
    }

    /// Whether `doc` satisfies every condition. A missing property equals only `null`.
    pub fn matches(&self, doc: &Value) -> bool {
        self.conditions.iter().all(|c| {
            let found = c.path.iter().try_fold(doc, |v, k| v.get(k)).unwrap_or(&Value::Null);
            let same = match (found, &c.value) {
                // 1 and 1.0 are the same number.
                (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                (a, b) => a == b,
            };
            same == c.equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn star_and_select_forms() {
        assert_eq!(parse("*").unwrap(), Query { collection: None, conditions: vec![] });
        assert_eq!(parse("  * ").unwrap().collection, None);
        let q = parse("select *   FROM enrollmentGroups").unwrap();
        assert_eq!(q.collection.as_deref(), Some("enrollmentgroups"));
        assert!(q.is_for("enrollmentGroups") && !q.is_for("enrollments"));
        assert!(parse("*").unwrap().is_for("anything"));
    }

    #[test]
    fn where_comparisons() {
        let q = parse(
            "SELECT * FROM enrollments WHERE provisioningStatus = 'enabled' AND attestation.type <> \"x509\" \
             and capabilities.iotEdge = true AND n = 1.0 and gone = null",
        )
        .unwrap();
        assert_eq!(q.conditions.len(), 5);
        assert_eq!(q.conditions[1].path, vec!["attestation", "type"]);
        let doc = json!({"provisioningStatus": "enabled", "attestation": {"type": "symmetricKey"},
            "capabilities": {"iotEdge": true}, "n": 1});
        assert!(q.matches(&doc));
        let doc = json!({"provisioningStatus": "disabled", "attestation": {"type": "symmetricKey"},
            "capabilities": {"iotEdge": true}, "n": 1});
        assert!(!q.matches(&doc));
        let x509 = json!({"provisioningStatus": "enabled", "attestation": {"type": "x509"},
            "capabilities": {"iotEdge": true}, "n": 1});
        assert!(!q.matches(&x509));
        assert!(parse("SELECT * FROM devices WHERE deviceId = 'it''s'").unwrap().matches(&json!({"deviceId": "it's"})));
        assert!(parse("SELECT * FROM devices WHERE tags.x != 'a'").unwrap().matches(&json!({"tags": {}})));
    }

    #[test]
    fn unsupported_is_refused_not_ignored() {
        for q in [
            "",
            "SELECT deviceId FROM devices",
            "SELECT COUNT() FROM devices",
            "SELECT * FROM devices WHERE a = 'b' OR c = 'd'",
            "SELECT * FROM devices WHERE NOT a = 'b'",
            "SELECT * FROM devices WHERE a > 1",
            "SELECT * FROM devices WHERE a IN ['b']",
            "SELECT * FROM devices WHERE is_defined(a)",
            "SELECT * FROM devices GROUP BY status",
            "SELECT * FROM devices WHERE",
            "SELECT * FROM devices WHERE a = 'b' AND",
            "SELECT * FROM devices WHERE a = 'unterminated",
            "SELECT * FROM devices WHERE a = b",
            "SELECT * FROM devices.modules",
            "SELECT * FROM devices WHERE a..b = 1",
            "SELECT * FROM devices; DROP TABLE devices",
            "DELETE FROM devices",
        ] {
            assert!(parse(q).is_err(), "{q:?} must be refused");
        }
        let many = (0..=MAX_CONDITIONS).map(|i| format!("a{i} = 1")).collect::<Vec<_>>().join(" AND ");
        assert!(parse(&format!("SELECT * FROM devices WHERE {many}")).is_err());
        assert!(parse(&"*".repeat(MAX_QUERY_CHARS + 1)).is_err());
    }

    proptest::proptest! {
        /// Any text parses or is refused; it never panics.
        #[test]
        fn any_text_is_parsed_or_refused(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }
    }
}
