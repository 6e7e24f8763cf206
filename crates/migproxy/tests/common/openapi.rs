//! `docs/api.yaml`, parsed, and a small validator of values against its schemas (see
//! `tests/openapi.rs` for what it checks, `openapi_call.rs` for the keywords it knows), for
//! every test that wants to hold a real response to the document.

use serde_json::{Value, json};

pub const DOCUMENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.yaml");

/// The OpenAPI document, parsed.
pub struct Doc(pub Value);

impl Doc {
    pub fn load() -> Doc {
        let text = std::fs::read_to_string(DOCUMENT).unwrap_or_else(|e| panic!("{DOCUMENT}: {e}"));
        let value: Value =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{DOCUMENT}: {e}"));
        Doc(value)
    }

    /// The node a `$ref` (`#/json/pointer`) names, if any.
    pub fn target(&self, reference: &str) -> Option<&Value> {
        self.0.pointer(reference.strip_prefix('#')?)
    }

    /// Follows `$ref`s to the node they name.
    pub fn resolve<'a>(&'a self, mut node: &'a Value) -> &'a Value {
        for _ in 0..32 {
            match node.get("$ref").and_then(Value::as_str) {
                Some(reference) => {
                    node = self
                        .target(reference)
                        .unwrap_or_else(|| panic!("unresolved $ref {reference}"));
                }
                None => return node,
            }
        }
        panic!("$ref loop at {node}");
    }

    pub fn schema(&self, name: &str) -> &Value {
        self.0
            .pointer(&format!("/components/schemas/{name}"))
            .unwrap_or_else(|| panic!("no schema {name} in the document"))
    }

    /// What is wrong with `value` according to `schema`; empty if nothing.
    pub fn validate(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.check(schema, value, "$", &mut errors);
        errors
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if value.is_null() {
            if schema["nullable"] != true {
                errors.push(format!("{at}: null, but not nullable"));
            }
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            errors.push(format!("{at}: {value} is not one of {}", json!(allowed)));
        }
        for part in schema
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.check(part, value, at, errors);
        }
        if let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array) {
            let mut why = Vec::new();
            let mut matching = 0;
            for alternative in alternatives {
                let mut wrong = Vec::new();
                self.check(alternative, value, at, &mut wrong);
                if wrong.is_empty() {
                    matching += 1;
                }
                why.extend(wrong);
            }
            if matching != 1 {
                errors.push(format!(
                    "{at}: matches {matching} of {} oneOf alternatives, not 1 ({})",
                    alternatives.len(),
                    why.join("; ")
                ));
            }
        }
        if let Some(kind) = schema.get("type").and_then(Value::as_str) {
            let fits = match kind {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                other => {
                    errors.push(format!("{at}: the document says type `{other}`"));
                    return;
                }
            };
            if !fits {
                errors.push(format!("{at}: {value} is not of type {kind}"));
                return;
            }
        }
        if let Some(n) = value.as_f64() {
            if let Some(minimum) = schema.get("minimum").and_then(Value::as_f64)
                && n < minimum
            {
                errors.push(format!("{at}: {value} is below the minimum {minimum}"));
            }
            if let Some(maximum) = schema.get("maximum").and_then(Value::as_f64)
                && n > maximum
            {
                errors.push(format!("{at}: {value} is above the maximum {maximum}"));
            }
        }
        if let Some(text) = value.as_str() {
            let length = text.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && length < min
            {
                errors.push(format!("{at}: {value} is shorter than {min}"));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && length > max
            {
                errors.push(format!("{at}: {value} is longer than {max}"));
            }
        }
        if let Some(object) = value.as_object() {
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = name.as_str().unwrap_or_default();
                if !object.contains_key(name) {
                    errors.push(format!("{at}: documented field `{name}` is missing"));
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            for (name, field) in object {
                let here = format!("{at}.{name}");
                match properties.and_then(|p| p.get(name)) {
                    Some(property) => self.check(property, field, &here, errors),
                    None => match schema.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            errors.push(format!("{here}: undocumented field ({field})"));
                        }
                        Some(extra @ Value::Object(_)) => self.check(extra, field, &here, errors),
                        _ => {}
                    },
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (i, item) in array.iter().enumerate() {
                self.check(items, item, &format!("{at}[{i}]"), errors);
            }
        }
    }
}
