use super::*;

fn accepts(schema: &str, text: &str) -> bool {
    let mut c = JsonConstraint::new(schema).unwrap();
    c.feed(text.as_bytes()) && c.complete()
}

const PERSON: &str = r#"{"type":"object","properties":{
        "name":{"type":"string","maxLength":8},
        "age":{"type":"integer"},
        "role":{"enum":["admin","user"]},
        "tags":{"type":"array","items":{"type":"string"},"maxItems":2},
        "score":{"type":"number"},
        "ok":{"type":"boolean"},
        "address":{"type":"object","properties":{"city":{"type":"string"}}}}}"#;

#[test]
fn documents_the_schema_accepts_are_matched_and_others_refused() {
    let good = r#"{"address":{"city":"Oslo"},"age":42,"name":"Ann","ok":true,"role":"user","score":-0.5,"tags":["a","b"]}"#;
    assert!(accepts(PERSON, good));
    assert!(serde_json::from_str::<Value>(good).is_ok());
    for bad in [
        r#"{"name":"Ann"}"#,                                         // properties missing
        r#"{"name":"Annabelle9","age":1"#,                           // over maxLength
        r#"{"name":"A","age":01"#,                                   // leading zero
        r#"{"name":"A","age":1.5"#,                                  // not an integer
        r#"{"name":"A","age":1,"role":"root""#,                      // not in the enum
        r#"{"name":"A","age":1,"role":"user","tags":["a","b","c"]"#, // over maxItems
        r#"{ "name""#,                                               // whitespace
        r#"{"name":"a
""#,                                            // an escape
    ] {
        let mut c = JsonConstraint::new(PERSON).unwrap();
        assert!(!c.feed(bad.as_bytes()) || !c.complete(), "{bad}");
    }
}

#[test]
fn a_number_or_enum_ends_where_the_next_text_begins() {
    let list = r#"{"type":"array","items":{"type":"number"},"minItems":1,"maxItems":3}"#;
    assert!(accepts(list, "[1,2.25,-3]"));
    assert!(!accepts(list, "[]"));
    assert!(!accepts(list, "[1,2,3,4]"));
    assert!(!accepts(list, "[1.]"));
    let numbers = r#"{"enum":[1,10,100]}"#;
    assert!(accepts(numbers, "1") && accepts(numbers, "10") && !accepts(numbers, "11"));
    let c = JsonConstraint::new(numbers).unwrap();
    assert!(c.allows(b"10") && !c.allows(b"2") && !c.allows(b""));
}

#[test]
fn strings_hold_only_well_formed_utf8() {
    let s = r#"{"type":"string","maxLength":3}"#;
    assert!(accepts(s, "\"añ€\""));
    for bad in [
        &b"\"\xc0\x80"[..],
        b"\"\xe0\x80\x80",
        b"\"\xed\xa0\x80",
        b"\"\xf4\x90",
        b"\"\xc3\"",
        b"\"\x80",
    ] {
        let mut c = JsonConstraint::new(s).unwrap();
        assert!(!c.feed(bad), "{bad:?}");
    }
    assert!(!accepts(s, "\"abcd\""));
}

#[test]
fn huge_schemas_and_required_names_outside_the_properties_are_refused() {
    let big: Vec<_> = (0..=MAX_ENUM).collect();
    let schema = serde_json::json!({ "enum": big }).to_string();
    assert!(matches!(
        JsonConstraint::new(&schema),
        Err(SchemaError::Invalid(..))
    ));
    let missing = r#"{"type":"object","properties":{"a":{"type":"integer"}},"required":["a","b"]}"#;
    assert!(matches!(
        JsonConstraint::new(missing),
        Err(SchemaError::Invalid(..))
    ));
    let mut c = JsonConstraint::new(r#"{"type":"integer"}"#).unwrap();
    assert!(c.feed(b"1") && c.complete() && !c.finished());
    let mut c = JsonConstraint::new(r#"{"properties":{"a":{"type":"integer"}}}"#).unwrap();
    assert!(c.feed(br#"{"a":1}"#) && c.finished());
}

#[test]
fn only_what_is_supported_is_taken() {
    for (schema, word) in [
        (r#"{"anyOf":[{"type":"string"}]}"#, "anyOf"),
        (r#"{"type":"string","pattern":"a+"}"#, "pattern"),
        (r##"{"$ref":"#/x"}"##, "$ref"),
    ] {
        assert_eq!(
            JsonConstraint::new(schema).unwrap_err(),
            SchemaError::Unsupported(word.into())
        );
    }
    assert!(matches!(
        JsonConstraint::new("{"),
        Err(SchemaError::NotJson(_))
    ));
    assert!(matches!(
        JsonConstraint::new(r#"{"type":"array"}"#),
        Err(SchemaError::Invalid(..))
    ));
}
