//! Structured outputs: a JSON Schema compiled into a byte-level matcher that says, for
//! any token's bytes, whether the text so far can still become a JSON document the schema
//! accepts. The decoder masks every token it refuses, so the answer is such a document.
//!
//! What is written is compact JSON (no whitespace) with all of an object's properties, in
//! the order of their names. Supported keywords: `type` (`object`, `array`, `string`,
//! `integer`, `number`, `boolean`, `null`), `properties`, `items`, `minItems`,
//! `maxItems`, `maxLength`, `enum`, `const`. Anything else that changes what a document
//! may be (`$ref`, `anyOf`, `pattern`, …) is refused with its name, rather than ignored.
//! Unbounded strings and arrays get a cap ([`DEFAULT_MAX_LENGTH`], [`DEFAULT_MAX_ITEMS`])
//! so every answer ends.

use std::sync::Arc;

use serde_json::Value;

/// Characters a string without `maxLength` may have.
pub const DEFAULT_MAX_LENGTH: usize = 200;
/// Items an array without `maxItems` may have.
pub const DEFAULT_MAX_ITEMS: usize = 16;
/// Digits of an integer part (and of a fraction).
const MAX_DIGITS: usize = 12;
/// How deep a schema may nest.
const MAX_DEPTH: usize = 32;
/// Bounds on a schema's size: every token of the vocabulary is checked against the
/// matcher at each step, so a huge enum or object from a client would stall the worker.
const MAX_SCHEMA_BYTES: usize = 64 << 10;
const MAX_ENUM: usize = 256;
const MAX_PROPERTIES: usize = 128;

/// Why a schema cannot constrain generation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("the JSON schema is not valid JSON: {0}")]
    NotJson(String),
    #[error(
        "JSON schema keyword `{0}` is not supported (supported: type, properties, items, minItems, maxItems, maxLength, enum, const)"
    )]
    Unsupported(String),
    #[error("JSON schema at {0}: {1}")]
    Invalid(String, String),
}

/// A compiled schema.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// Each property as the text before its value (`{"name":` or `,"name":`) and its
    /// value.
    Object(Vec<(Arc<str>, Arc<Node>)>),
    Array {
        item: Arc<Node>,
        min: usize,
        max: usize,
    },
    String {
        max: usize,
    },
    Integer,
    Number,
    /// One of these JSON texts (`enum`, `const`, `true`/`false`, `null`).
    OneOf(Vec<Arc<str>>),
}

fn compile(schema: &Value, at: &str, depth: usize) -> Result<Node, SchemaError> {
    let invalid = |why: &str| SchemaError::Invalid(at.to_string(), why.to_string());
    if depth > MAX_DEPTH {
        return Err(invalid("nested too deep"));
    }
    let obj = schema
        .as_object()
        .ok_or_else(|| invalid("a schema is an object"))?;
    const IGNORED: &[&str] = &[
        "type",
        "properties",
        "items",
        "minItems",
        "maxItems",
        "maxLength",
        "enum",
        "const",
        "required",
        "additionalProperties",
        "title",
        "description",
        "$schema",
        "default",
        "examples",
        "strict",
    ];
    if let Some(key) = obj.keys().find(|k| !IGNORED.contains(&k.as_str())) {
        return Err(SchemaError::Unsupported(key.clone()));
    }
    let literal = |v: &Value| Arc::<str>::from(v.to_string());
    if let Some(value) = obj.get("const") {
        return Ok(Node::OneOf(vec![literal(value)]));
    }
    if let Some(values) = obj.get("enum") {
        let values = values.as_array().ok_or_else(|| invalid("enum is a list"))?;
        if values.is_empty() {
            return Err(invalid("enum is empty"));
        }
        if values.len() > MAX_ENUM {
            return Err(invalid(&format!("more than {MAX_ENUM} enum values")));
        }
        return Ok(Node::OneOf(values.iter().map(literal).collect()));
    }
    let count = |key: &str| -> Result<Option<usize>, SchemaError> {
        match obj.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| invalid(&format!("{key} is a count"))),
        }
    };
    let kind = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return Err(SchemaError::Unsupported("type (a list of types)".into())),
        None if obj.contains_key("properties") => "object",
        None => return Err(invalid("no type")),
    };
    Ok(match kind {
        "object" => {
            let mut props = Vec::new();
            if let Some(p) = obj.get("properties") {
                let p = p
                    .as_object()
                    .ok_or_else(|| invalid("properties is an object"))?;
                if p.len() > MAX_PROPERTIES {
                    return Err(invalid(&format!("more than {MAX_PROPERTIES} properties")));
                }
                // Every property is written, so a required one must be among them.
                if let Some(Value::Array(required)) = obj.get("required")
                    && let Some(missing) = required
                        .iter()
                        .find(|r| r.as_str().is_none_or(|r| !p.contains_key(r)))
                {
                    return Err(invalid(&format!("required {missing} is not a property")));
                }
                for (i, (name, sub)) in p.iter().enumerate() {
                    let open = if i == 0 { "{" } else { "," };
                    let key = Value::String(name.clone());
                    let value = compile(sub, &format!("{at}.{name}"), depth + 1)?;
                    props.push((Arc::from(format!("{open}{key}:")), Arc::new(value)));
                }
            }
            Node::Object(props)
        }
        "array" => {
            let items = obj
                .get("items")
                .ok_or_else(|| invalid("an array needs items"))?;
            let min = count("minItems")?.unwrap_or(0);
            let max = count("maxItems")?.unwrap_or(DEFAULT_MAX_ITEMS.max(min));
            if min > max {
                return Err(invalid("minItems exceeds maxItems"));
            }
            Node::Array {
                item: Arc::new(compile(items, &format!("{at}[]"), depth + 1)?),
                min,
                max,
            }
        }
        "string" => Node::String {
            max: count("maxLength")?.unwrap_or(DEFAULT_MAX_LENGTH),
        },
        "integer" => Node::Integer,
        "number" => Node::Number,
        "boolean" => Node::OneOf(vec!["true".into(), "false".into()]),
        "null" => Node::OneOf(vec!["null".into()]),
        other => return Err(invalid(&format!("unknown type {other}"))),
    })
}

/// Where the matcher is inside one value.
#[derive(Debug, Clone)]
enum Frame {
    /// A value of this node comes next.
    Value(Arc<Node>),
    /// Fixed text, `pos` bytes of it written.
    Literal(Arc<str>, usize),
    /// Inside a string: characters written (at most `max`), continuation bytes the
    /// current UTF-8 character still needs, and the range the next one must be in.
    InString {
        len: usize,
        max: usize,
        pending: u8,
        next: (u8, u8),
    },
    /// A number: an optional `-`, `int` digits (just `0`, or not starting with one),
    /// then, when `fraction` allows, a point and `frac` digits.
    InNumber {
        fraction: bool,
        negative: bool,
        int: usize,
        zero: bool,
        point: bool,
        frac: usize,
    },
    /// Text that must become one of these, `pos` bytes written.
    Choice(Arc<[Arc<str>]>, usize),
    /// Inside an array after `[` or an item: `count` items so far.
    InArray {
        item: Arc<Node>,
        count: usize,
        min: usize,
        max: usize,
    },
}

/// The matcher: what may still come.
#[derive(Debug, Clone)]
pub struct JsonConstraint {
    stack: Vec<Frame>,
}

/// What a frame made of a byte.
enum Step {
    /// Took it.
    Took,
    /// Is complete and does not take it: the frame below gets it.
    Done,
    /// Refuses it.
    No,
}

impl JsonConstraint {
    /// Compiles the schema in `text` (JSON).
    pub fn new(text: &str) -> Result<Self, SchemaError> {
        if text.len() > MAX_SCHEMA_BYTES {
            return Err(SchemaError::Invalid(
                "$".into(),
                format!("a schema of more than {MAX_SCHEMA_BYTES} bytes"),
            ));
        }
        let schema: Value =
            serde_json::from_str(text).map_err(|e| SchemaError::NotJson(e.to_string()))?;
        let root = compile(&schema, "$", 0)?;
        Ok(JsonConstraint {
            stack: vec![Frame::Value(Arc::new(root))],
        })
    }

    /// Whether the text so far is a whole document (nothing more may come).
    pub fn complete(&self) -> bool {
        self.stack.iter().all(Frame::may_end)
    }

    /// Whether the document is whole and nothing may follow (a top-level number or enum
    /// value may still grow: `1` → `10`; then end-of-sequence decides).
    pub fn finished(&self) -> bool {
        self.complete()
            && self.stack.iter().all(|f| match f {
                Frame::InNumber { .. } => false,
                Frame::Choice(options, pos) => options.iter().all(|o| o.len() == *pos),
                _ => true,
            })
    }

    /// Takes `bytes`; false (and a state to throw away) when the schema refuses them.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed_byte(b))
    }

    /// Whether `bytes` may come next (without taking them).
    pub fn allows(&self, bytes: &[u8]) -> bool {
        !bytes.is_empty() && self.clone().feed(bytes)
    }

    fn feed_byte(&mut self, b: u8) -> bool {
        loop {
            let Some(top) = self.stack.pop() else {
                return false;
            };
            match self.step(top, b) {
                Step::Took => return true,
                Step::Done => continue,
                Step::No => return false,
            }
        }
    }

    /// Runs `frame` on `b`, pushing what remains of it (and what it opened).
    fn step(&mut self, frame: Frame, b: u8) -> Step {
        match frame {
            Frame::Value(node) => {
                self.open(&node);
                match self.stack.pop() {
                    Some(first) => self.step(first, b),
                    None => Step::No,
                }
            }
            Frame::Literal(text, pos) => {
                if text.as_bytes().get(pos) != Some(&b) {
                    return Step::No;
                }
                if pos + 1 < text.len() {
                    self.stack.push(Frame::Literal(text, pos + 1));
                }
                Step::Took
            }
            Frame::InString {
                len,
                max,
                pending,
                next,
            } => {
                // Well-formed UTF-8 only (no overlong forms, surrogates or values past
                // U+10FFFF): each lead byte sets the range of the byte after it.
                const ANY: (u8, u8) = (0x80, 0xbf);
                let state = match b {
                    _ if pending > 0 => {
                        (next.0..=next.1)
                            .contains(&b)
                            .then_some((len, pending - 1, ANY))
                    }
                    b'"' => return Step::Took,
                    _ if len >= max => None,
                    0x20..=0x7e if b != b'\\' => Some((len + 1, 0, ANY)),
                    0xc2..=0xdf => Some((len + 1, 1, ANY)),
                    0xe0 => Some((len + 1, 2, (0xa0, 0xbf))),
                    0xed => Some((len + 1, 2, (0x80, 0x9f))),
                    0xe1..=0xef => Some((len + 1, 2, ANY)),
                    0xf0 => Some((len + 1, 3, (0x90, 0xbf))),
                    0xf4 => Some((len + 1, 3, (0x80, 0x8f))),
                    0xf1..=0xf3 => Some((len + 1, 3, ANY)),
                    _ => None,
                };
                match state {
                    Some((len, pending, next)) => {
                        self.stack.push(Frame::InString {
                            len,
                            max,
                            pending,
                            next,
                        });
                        Step::Took
                    }
                    None => Step::No,
                }
            }
            Frame::InNumber {
                fraction,
                negative,
                int,
                zero,
                point,
                frac,
            } => {
                let mut next = Frame::InNumber {
                    fraction,
                    negative,
                    int,
                    zero,
                    point,
                    frac,
                };
                let took = match (&mut next, b) {
                    (Frame::InNumber { negative, .. }, b'-') if int == 0 && !*negative => {
                        *negative = true;
                        true
                    }
                    (Frame::InNumber { int, zero, .. }, b'0'..=b'9')
                        if !point && !*zero && *int < MAX_DIGITS =>
                    {
                        *zero = *int == 0 && b == b'0';
                        *int += 1;
                        true
                    }
                    (Frame::InNumber { frac, .. }, b'0'..=b'9') if point && *frac < MAX_DIGITS => {
                        *frac += 1;
                        true
                    }
                    (Frame::InNumber { point, .. }, b'.') if fraction && int > 0 && !*point => {
                        *point = true;
                        true
                    }
                    _ => false,
                };
                if took {
                    self.stack.push(next);
                    Step::Took
                } else if next.may_end() {
                    Step::Done
                } else {
                    Step::No
                }
            }
            Frame::Choice(options, pos) => {
                // Every option left shares the `pos` bytes written.
                let fits = |o: &&Arc<str>| o.as_bytes().get(pos) == Some(&b);
                let left: Vec<Arc<str>> = options.iter().filter(fits).cloned().collect();
                if left.is_empty() {
                    return if options.iter().any(|o| o.len() == pos) {
                        Step::Done
                    } else {
                        Step::No
                    };
                }
                if left.iter().any(|o| o.len() > pos + 1) {
                    self.stack.push(Frame::Choice(left.into(), pos + 1));
                }
                Step::Took
            }
            Frame::InArray {
                item,
                count,
                min,
                max,
            } => {
                let after = |count| Frame::InArray {
                    item: item.clone(),
                    count,
                    min,
                    max,
                };
                match b {
                    b']' if count >= min => Step::Took,
                    b',' if count > 0 && count < max => {
                        self.stack.push(after(count + 1));
                        self.stack.push(Frame::Value(item.clone()));
                        Step::Took
                    }
                    _ if count == 0 && max > 0 => {
                        self.stack.push(after(1));
                        self.step(Frame::Value(item.clone()), b)
                    }
                    _ => Step::No,
                }
            }
        }
    }

    /// Pushes the frames that write a value of `node`, the first on top.
    fn open(&mut self, node: &Node) {
        match node {
            Node::Object(props) if props.is_empty() => {
                self.stack.push(Frame::Literal("{}".into(), 0));
            }
            Node::Object(props) => {
                self.stack.push(Frame::Literal("}".into(), 0));
                for (key, value) in props.iter().rev() {
                    self.stack.push(Frame::Value(value.clone()));
                    self.stack.push(Frame::Literal(key.clone(), 0));
                }
            }
            Node::Array { item, min, max } => {
                self.stack.push(Frame::InArray {
                    item: item.clone(),
                    count: 0,
                    min: *min,
                    max: *max,
                });
                self.stack.push(Frame::Literal("[".into(), 0));
            }
            Node::String { max } => {
                self.stack.push(Frame::InString {
                    len: 0,
                    max: *max,
                    pending: 0,
                    next: (0x80, 0xbf),
                });
                self.stack.push(Frame::Literal("\"".into(), 0));
            }
            Node::Integer | Node::Number => self.stack.push(Frame::InNumber {
                fraction: matches!(node, Node::Number),
                negative: false,
                int: 0,
                zero: false,
                point: false,
                frac: 0,
            }),
            Node::OneOf(options) => self.stack.push(Frame::Choice(options.clone().into(), 0)),
        }
    }
}

impl Frame {
    /// Whether the value this frame writes may end here.
    fn may_end(&self) -> bool {
        match self {
            Frame::InNumber {
                int, point, frac, ..
            } => *int > 0 && (!*point || *frac > 0),
            Frame::Choice(options, pos) => options.iter().any(|o| o.len() == *pos),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests;
