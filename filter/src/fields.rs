//! Reading the plugin JSON field by field.
//!
//! The configuration is parsed once into a [`serde_json::Value`] (refusing duplicate
//! keys) and then read by hand: every refused value names its full field path, e.g.
//! `routes[2].pricing.per_token.max_units`. One generic JSON reader serves every
//! configuration struct instead of a derived deserializer per struct, which keeps the
//! wasm module small.

use serde_json::{Map, Value};

use crate::config::ConfigError;

/// Parses the plugin JSON; a key written twice in one object is refused.
pub fn parse(bytes: &[u8]) -> Result<Value, ConfigError> {
    x402_proto::json::parse_strict(bytes).map_err(|e| ConfigError::Json(e.to_string()))
}

/// `parent.name`, or `name` at the top level.
pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// `parent[index]`.
pub fn at(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

pub fn invalid(field: String, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

/// A JSON object of the configuration, at `path`, with only known fields.
pub struct Obj<'v> {
    path: String,
    map: &'v Map<String, Value>,
}

impl<'v> Obj<'v> {
    /// `value` must be an object whose keys are all in `known`.
    pub fn new(path: String, value: &'v Value, known: &[&str]) -> Result<Obj<'v>, ConfigError> {
        let Some(map) = value.as_object() else {
            return Err(invalid(path, "must be a JSON object"));
        };
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ConfigError::Unknown {
                field: join(&path, key),
                expected: known.join(", "),
            });
        }
        Ok(Obj { path, map })
    }

    /// The full path of field `name`.
    pub fn field(&self, name: &str) -> String {
        join(&self.path, name)
    }

    /// Field `name` as written, `null` included.
    pub fn get(&self, name: &str) -> Option<&'v Value> {
        self.map.get(name)
    }

    /// Field `name` unless absent or `null` (an optional field).
    pub fn opt(&self, name: &str) -> Option<&'v Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// A required field.
    pub fn req(&self, name: &str) -> Result<&'v Value, ConfigError> {
        self.get(name).ok_or_else(|| ConfigError::Missing {
            field: self.field(name),
        })
    }

    pub fn string(&self, name: &str) -> Result<String, ConfigError> {
        string(self.field(name), self.req(name)?)
    }

    pub fn opt_string(&self, name: &str) -> Result<Option<String>, ConfigError> {
        self.opt(name)
            .map(|v| string(self.field(name), v))
            .transpose()
    }

    /// A string field with a default when absent.
    pub fn string_or(&self, name: &str, default: &str) -> Result<String, ConfigError> {
        match self.get(name) {
            None => Ok(default.to_owned()),
            Some(v) => string(self.field(name), v),
        }
    }

    pub fn uint<T: TryFrom<u64>>(&self, name: &str) -> Result<T, ConfigError> {
        uint(self.field(name), self.req(name)?)
    }

    pub fn opt_uint<T: TryFrom<u64>>(&self, name: &str) -> Result<Option<T>, ConfigError> {
        self.opt(name)
            .map(|v| uint(self.field(name), v))
            .transpose()
    }

    /// An integer field with a default when absent.
    pub fn uint_or<T: TryFrom<u64>>(&self, name: &str, default: T) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => uint(self.field(name), v),
        }
    }

    /// A boolean field, `false` when absent.
    pub fn flag(&self, name: &str) -> Result<bool, ConfigError> {
        self.flag_or(name, false)
    }

    /// A boolean field, `default` when absent.
    pub fn flag_or(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| invalid(self.field(name), "must be true or false")),
        }
    }

    /// An array field with each element's path; `required` or empty when absent.
    pub fn list(
        &self,
        name: &str,
        required: bool,
    ) -> Result<Vec<(String, &'v Value)>, ConfigError> {
        let field = self.field(name);
        let value = match self.get(name) {
            None if required => return Err(ConfigError::Missing { field }),
            None => return Ok(Vec::new()),
            Some(v) => v,
        };
        let Some(items) = value.as_array() else {
            return Err(invalid(field, "must be a JSON array"));
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, v)| (at(&field, i), v))
            .collect())
    }

    /// An array of strings; `required` or empty when absent.
    pub fn strings(&self, name: &str, required: bool) -> Result<Vec<String>, ConfigError> {
        self.list(name, required)?
            .into_iter()
            .map(|(field, v)| string(field, v))
            .collect()
    }

    /// An object field with only `known` fields, `None` when absent or `null`.
    pub fn opt_obj(&self, name: &str, known: &[&str]) -> Result<Option<Obj<'v>>, ConfigError> {
        self.opt(name)
            .map(|v| Obj::new(self.field(name), v, known))
            .transpose()
    }
}

pub fn string(field: String, value: &Value) -> Result<String, ConfigError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        _ => Err(invalid(field, "must be a string")),
    }
}

/// A whole number that fits in `T` (one of the unsigned integer types).
pub fn uint<T: TryFrom<u64>>(field: String, value: &Value) -> Result<T, ConfigError> {
    let n = value.as_u64();
    match n.and_then(|n| T::try_from(n).ok()) {
        Some(v) => Ok(v),
        None => Err(not_a_uint(field, std::mem::size_of::<T>())),
    }
}

fn not_a_uint(field: String, bytes: usize) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: format!("must be a whole number from 0 to 2^{} - 1", bytes * 8),
    }
}

/// An enum value written as `"name"` or as an object with one key, `{"name": value}`:
/// the name and the value (`None` for the plain string).
pub fn variant<'v>(
    field: &str,
    value: &'v Value,
    names: &[&str],
) -> Result<(&'v str, Option<&'v Value>), ConfigError> {
    let (name, inner) = match value {
        Value::String(s) => (s.as_str(), None),
        Value::Object(map) if map.len() == 1 => match map.iter().next() {
            Some((k, v)) => (k.as_str(), Some(v)),
            None => return Err(invalid(field.to_owned(), "must name one variant")),
        },
        _ => {
            return Err(ConfigError::Invalid {
                field: field.to_owned(),
                reason: format!("must be one of {}", names.join(", ")),
            })
        }
    };
    if !names.contains(&name) {
        return Err(ConfigError::Invalid {
            field: field.to_owned(),
            reason: format!(
                "unknown variant `{name}`, expected one of {}",
                names.join(", ")
            ),
        });
    }
    Ok((name, inner))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        for text in [r#"{"a":1,"a":2}"#, r#"{"x":[{"b":1,"c":2,"b":3}]}"#] {
            match parse(text.as_bytes()) {
                Err(ConfigError::Json(e)) => assert!(e.contains("duplicate field"), "{e}"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            parse(br#"{"a":[1,-2,2.5,"s",true,null,{}]}"#).unwrap(),
            serde_json::json!({"a": [1, -2, 2.5, "s", true, null, {}]})
        );
    }

    #[test]
    fn errors_name_the_full_path() {
        let v = serde_json::json!({"n": -1, "s": 3, "o": {"zz": 1}, "l": [1, "x"]});
        let o = Obj::new("routes[0]".into(), &v, &["n", "s", "o", "l", "m"]).unwrap();
        let field = |e: ConfigError| match e {
            ConfigError::Invalid { field, .. }
            | ConfigError::Missing { field }
            | ConfigError::Unknown { field, .. } => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(o.uint::<u32>("n").unwrap_err()), "routes[0].n");
        assert_eq!(field(o.string("s").unwrap_err()), "routes[0].s");
        assert_eq!(field(o.string("m").unwrap_err()), "routes[0].m");
        assert_eq!(field(o.strings("l", true).unwrap_err()), "routes[0].l[0]");
        let err = o.opt_obj("o", &["a"]).err().unwrap();
        assert_eq!(field(err), "routes[0].o.zz");
        assert!(Obj::new(String::new(), &v, &["n"]).is_err());
    }
}
