//! The SQL-like queries of Azure's service APIs, in the subset Fleetgate answers: `*` (what the
//! DPS service SDKs send by default), `SELECT * FROM <collection>`, and a `WHERE` clause as IoT
//! Hub's query language documents it ("IoT Hub query language", WHERE clause): comparisons of a
//! property path with a string, number, boolean or `null` (`=`, `!=`, `<>`, `<`, `>`, `<=`,
//! `>=`), `IN` / `NIN` a list of such values, joined by `AND` and `OR`, negated by `NOT`, grouped
//! by parentheses. Anything else (projections, functions, `GROUP BY`, `TOP`…) is refused with the
//! reason, never ignored: a silently dropped condition would answer records the caller did not
//! ask for.
//!
//! Pure: [`parse`] takes any text and returns a [`Query`] or a [`QueryError`]; [`Query::matches`]
//! tests one JSON document (the record as the API answers it).

use std::cmp::Ordering;

use serde_json::Value;

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The collection after `FROM`, lower-cased; `None` for `*`.
    pub collection: Option<String>,
    /// The `WHERE` clause; `None` matches every record.
    pub filter: Option<Expr>,
}

/// A `WHERE` expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Compare(Condition),
    /// `path IN [values]` (`negated`: `NIN`).
    In {
        path: Vec<String>,
        values: Vec<Value>,
        negated: bool,
    },
}

/// A comparison of a property with a constant.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The property path, e.g. `["attestation", "type"]` for `attestation.type`.
    pub path: Vec<String>,
    pub op: Op,
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// The longest query text parsed (Azure's limit is far larger; a registry query is short).
pub const MAX_QUERY_CHARS: usize = 8192;
/// The most comparisons (and `IN` lists) in one `WHERE`.
pub const MAX_CONDITIONS: usize = 32;
/// The deepest nesting of parentheses and `NOT` (the parser recurses on them).
pub const MAX_DEPTH: usize = 16;
/// The most values in one `IN` list.
pub const MAX_IN_VALUES: usize = 100;

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Num(serde_json::Number),
    Star,
    Op(Op),
    Open,
    Close,
    OpenList,
    CloseList,
    Comma,
}

fn err<T>(msg: impl Into<String>) -> Result<T, QueryError> {
    Err(QueryError(msg.into()))
}

fn tokenize(q: &str) -> Result<Vec<Token>, QueryError> {
    let mut out = Vec::new();
    let mut chars = q.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        let single = match c {
            '*' => Some(Token::Star),
            '=' => Some(Token::Op(Op::Eq)),
            '(' => Some(Token::Open),
            ')' => Some(Token::Close),
            '[' => Some(Token::OpenList),
            ']' => Some(Token::CloseList),
            ',' => Some(Token::Comma),
            _ => None,
        };
        if let Some(t) = single {
            chars.next();
            out.push(t);
        } else if c.is_whitespace() {
            chars.next();
        } else if c == '!' || c == '<' || c == '>' {
            chars.next();
            let next = chars.peek().map(|&(_, n)| n);
            let (op, two) = match (c, next) {
                ('!', Some('=')) | ('<', Some('>')) => (Op::Ne, true),
                ('<', Some('=')) => (Op::Le, true),
                ('>', Some('=')) => (Op::Ge, true),
                ('<', _) => (Op::Lt, false),
                ('>', _) => (Op::Gt, false),
                _ => return err(format!("Unsupported operator at position {i}.")),
            };
            if two {
                chars.next();
            }
            out.push(Token::Op(op));
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

/// Words that cannot name a property: the grammar's own, and SQL a caller may expect but the
/// subset lacks (refused by name rather than read as a property).
const RESERVED: &[&str] = &[
    "and", "or", "not", "in", "nin", "like", "between", "is", "group", "order", "top", "select", "from", "where",
    "true", "false", "null",
];

/// Parses a query. Keywords are case-insensitive; property names are compared as written.
pub fn parse(q: &str) -> Result<Query, QueryError> {
    if q.chars().count() > MAX_QUERY_CHARS {
        return err(format!("The query is longer than {MAX_QUERY_CHARS} characters."));
    }
    let toks = tokenize(q)?;
    if toks == [Token::Star] {
        return Ok(Query::all());
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
    match it.next() {
        None => return Ok(Query { collection: Some(collection), filter: None }),
        Some(t) if keyword(Some(t), "where") => {}
        Some(_) => return err("Only a WHERE clause may follow the collection."),
    }
    let mut p = Parser { toks: &toks[toks.len() - it.len()..], pos: 0, conditions: 0 };
    let filter = p.or(0)?;
    match p.toks.get(p.pos) {
        None => Ok(Query { collection: Some(collection), filter: Some(filter) }),
        Some(Token::Word(w)) => err(format!("'{w}' is not supported here; conditions are joined by AND or OR.")),
        Some(Token::Close) => err("Unbalanced ')'."),
        Some(_) => err("Expected AND, OR or the end of the query after a condition."),
    }
}

/// Recursive descent over the `WHERE` tokens: OR binds loosest, then AND, then NOT.
struct Parser<'a> {
    toks: &'a [Token],
    pos: usize,
    conditions: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<&Token> {
        let t = self.toks.get(self.pos);
        self.pos += 1;
        t
    }

    fn or(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let mut e = self.and(depth)?;
        while keyword(self.peek(), "or") {
            self.pos += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and(depth)?));
        }
        Ok(e)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let mut e = self.not(depth)?;
        while keyword(self.peek(), "and") {
            self.pos += 1;
            e = Expr::And(Box::new(e), Box::new(self.not(depth)?));
        }
        Ok(e)
    }

    fn not(&mut self, depth: usize) -> Result<Expr, QueryError> {
        if depth >= MAX_DEPTH {
            return err(format!("The WHERE clause nests deeper than {MAX_DEPTH} levels."));
        }
        if keyword(self.peek(), "not") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.not(depth + 1)?)));
        }
        if self.peek() == Some(&Token::Open) {
            self.pos += 1;
            let e = self.or(depth + 1)?;
            if self.next() != Some(&Token::Close) {
                return err("Expected ')'.");
            }
            return Ok(e);
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, QueryError> {
        self.conditions += 1;
        if self.conditions > MAX_CONDITIONS {
            return err(format!("At most {MAX_CONDITIONS} conditions are supported."));
        }
        let path = match self.next() {
            Some(Token::Word(w)) if !RESERVED.iter().any(|k| w.eq_ignore_ascii_case(k)) => w.clone(),
            Some(Token::Word(w)) => return err(format!("'{w}' is not supported in a WHERE clause.")),
            _ => return err("Expected a property name in the WHERE clause."),
        };
        if self.peek() == Some(&Token::Open) {
            return err(format!("Functions ('{path}(…)') are not supported in a WHERE clause."));
        }
        let path: Vec<String> = path.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return err("A property path has an empty name.");
        }
        let negated = match self.next() {
            Some(Token::Op(op)) => {
                let op = *op;
                let value = self.value()?;
                return Ok(Expr::Compare(Condition { path, op, value }));
            }
            Some(t) if keyword(Some(t), "in") => false,
            Some(t) if keyword(Some(t), "nin") => true,
            Some(Token::Word(w)) => {
                return err(format!("'{w}' is not supported; only =, !=, <>, <, >, <=, >=, IN and NIN are."))
            }
            _ => return err("Expected a comparison operator, IN or NIN after a property name."),
        };
        if self.next() != Some(&Token::OpenList) {
            return err("Expected '[' after IN or NIN.");
        }
        let mut values = Vec::new();
        loop {
            values.push(self.value()?);
            if values.len() > MAX_IN_VALUES {
                return err(format!("At most {MAX_IN_VALUES} values are supported in an IN list."));
            }
            match self.next() {
                Some(Token::Comma) => {}
                Some(Token::CloseList) => break,
                _ => return err("Expected ',' or ']' in an IN list."),
            }
        }
        Ok(Expr::In { path, values, negated })
    }

    fn value(&mut self) -> Result<Value, QueryError> {
        Ok(match self.next() {
            Some(Token::Str(s)) => Value::String(s.clone()),
            Some(Token::Num(n)) => Value::Number(n.clone()),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("null") => Value::Null,
            _ => return err("Expected a string, number, true, false or null."),
        })
    }
}

/// `a` and `b` are the same value; 1 and 1.0 are the same number.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

/// The order of two numbers or two strings; other pairs do not compare (a range condition on
/// them is false, as in IoT Hub's language, where comparing different types is undefined).
fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

impl Expr {
    fn matches(&self, doc: &Value) -> bool {
        let get = |path: &[String]| path.iter().try_fold(doc, |v, k| v.get(k)).unwrap_or(&Value::Null);
        match self {
            Expr::And(a, b) => a.matches(doc) && b.matches(doc),
            Expr::Or(a, b) => a.matches(doc) || b.matches(doc),
            Expr::Not(e) => !e.matches(doc),
            Expr::In { path, values, negated } => {
                let found = get(path);
                values.iter().any(|v| same(found, v)) != *negated
            }
            Expr::Compare(c) => {
                let found = get(&c.path);
                match c.op {
                    // A missing property equals only `null`.
                    Op::Eq => same(found, &c.value),
                    Op::Ne => !same(found, &c.value),
                    Op::Lt => order(found, &c.value) == Some(Ordering::Less),
                    Op::Gt => order(found, &c.value) == Some(Ordering::Greater),
                    Op::Le => matches!(order(found, &c.value), Some(Ordering::Less | Ordering::Equal)),
                    Op::Ge => matches!(order(found, &c.value), Some(Ordering::Greater | Ordering::Equal)),
                }
            }
        }
    }
}

impl Query {
    /// `*`: every record of any collection.
    pub fn all() -> Self {
        Query { collection: None, filter: None }
    }

    /// Whether the query is for `collection` (compared case-insensitively); `*` is for any.
    pub fn is_for(&self, collection: &str) -> bool {
        self.collection.as_deref().is_none_or(|c| c.eq_ignore_ascii_case(collection))
    }

    /// Whether `doc` satisfies the `WHERE` clause (always, without one).
    pub fn matches(&self, doc: &Value) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(doc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn star_and_select_forms() {
        assert_eq!(parse("*").unwrap(), Query::all());
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

    /// The documented WHERE forms Azure's registries answer: OR, NOT, parentheses, range
    /// comparisons, IN / NIN.
    #[test]
    fn or_not_parentheses_ranges_and_lists() {
        let sym = json!({"provisioningStatus": "enabled", "attestation": {"type": "symmetricKey"}, "n": 5, "s": "b"});
        let x509 = json!({"provisioningStatus": "disabled", "attestation": {"type": "x509"}, "n": 1});
        let tpm = json!({"provisioningStatus": "enabled", "attestation": {"type": "tpm"}, "n": 10});
        for (q, expect) in [
            ("attestation.type = 'symmetricKey' OR attestation.type = 'x509'", [true, true, false]),
            ("provisioningStatus='enabled' AND attestation.type='symmetricKey'", [true, false, false]),
            ("NOT provisioningStatus = 'enabled'", [false, true, false]),
            // AND binds tighter than OR; parentheses change it.
            ("attestation.type = 'x509' OR provisioningStatus = 'enabled' AND n > 7", [false, true, true]),
            ("(attestation.type = 'x509' OR provisioningStatus = 'enabled') AND n > 7", [false, false, true]),
            ("n >= 5 AND n <= 5", [true, false, false]),
            ("n < 5", [false, true, false]),
            ("s > 'a'", [true, false, false]),
            // A range against another type is false either way round.
            ("n > 'a' OR s < 3", [false, false, false]),
            ("attestation.type IN ['tpm', 'x509']", [false, true, true]),
            ("attestation.type NIN ['tpm', 'x509']", [true, false, false]),
            ("NOT (n IN [1, 10.0])", [true, false, false]),
            ("s = null", [false, true, true]),
        ] {
            let parsed = parse(&format!("SELECT * FROM enrollments WHERE {q}")).unwrap_or_else(|e| panic!("{q}: {e}"));
            let got = [&sym, &x509, &tpm].map(|d| parsed.matches(d));
            assert_eq!(got, expect, "{q}");
        }
    }

    #[test]
    fn unsupported_is_refused_not_ignored() {
        for q in [
            "",
            "SELECT deviceId FROM devices",
            "SELECT COUNT() FROM devices",
            "SELECT * FROM devices WHERE a = 'b' OR",
            "SELECT * FROM devices WHERE NOT",
            "SELECT * FROM devices WHERE (a = 'b'",
            "SELECT * FROM devices WHERE a = 'b')",
            "SELECT * FROM devices WHERE a IN 'b'",
            "SELECT * FROM devices WHERE a IN ['b'",
            "SELECT * FROM devices WHERE a IN []",
            "SELECT * FROM devices WHERE a LIKE 'b%'",
            "SELECT * FROM devices WHERE STARTSWITH(a, 'b')",
            "SELECT * FROM devices WHERE a = 'b' c = 'd'",
            "SELECT TOP 3 * FROM devices",
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
        let deep = format!("SELECT * FROM devices WHERE {}a = 1{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(parse(&deep).is_err());
        let nots = format!("SELECT * FROM devices WHERE {}a = 1", "NOT ".repeat(100));
        assert!(parse(&nots).is_err());
        let list = (0..=MAX_IN_VALUES).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert!(parse(&format!("SELECT * FROM devices WHERE a IN [{list}]")).is_err());
    }

    proptest::proptest! {
        /// Any text parses or is refused; it never panics.
        #[test]
        fn any_text_is_parsed_or_refused(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }
    }
}
