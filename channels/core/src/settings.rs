//! Turning a channel's settings (from config or the admin API) into a kind's typed settings,
//! with errors that name the field.

use serde::de::DeserializeOwned;
use std::fmt;

/// A settings problem, naming the field relative to the channel (`bot_token`,
/// `proxy.port`). The registry prefixes it with `channels.<id>.`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingsError {
    pub field: String,
    pub message: String,
}

impl SettingsError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SettingsError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for SettingsError {}

/// Deserializes settings into `T`, reporting the path of the offending field. Use
/// `#[serde(deny_unknown_fields)]` on `T` so that a misspelt key is reported, not ignored.
pub fn parse_settings<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, SettingsError> {
    serde_path_to_error::deserialize(value).map_err(path_error)
}

/// Parses a JSON body straight into `T` in one pass, errors naming the field like
/// [`parse_settings`]; a body that is not JSON at all is an error of the field `body`.
pub fn parse_json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, SettingsError> {
    let not_json = |e: serde_json::Error| SettingsError::new("body", format!("the body is not JSON: {e}"));
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        if e.inner().is_syntax() || e.inner().is_eof() {
            not_json(e.into_inner())
        } else {
            path_error(e)
        }
    })?;
    de.end().map_err(not_json)?;
    Ok(value)
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> SettingsError {
    let path = e.path().to_string();
    let inner = e.into_inner().to_string();
    // Name the unknown (or missing) field itself, whether or not the path already ends
    // with it, so the message points at the key to fix.
    let field = match (path.as_str(), named_field(&inner)) {
        (".", Some(f)) => f.to_owned(),
        (p, Some(f)) if p != f && !p.ends_with(&format!(".{f}")) => format!("{p}.{f}"),
        (".", None) => String::new(),
        (p, _) => p.to_owned(),
    };
    SettingsError::new(field, inner)
}

fn named_field(msg: &str) -> Option<&str> {
    let rest = msg.strip_prefix("unknown field `").or_else(|| msg.strip_prefix("missing field `"))?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct S {
        url: String,
        #[serde(default)]
        retries: u32,
    }

    #[test]
    fn names_the_unknown_field() {
        let e = parse_settings::<S>(&serde_json::json!({"url": "x", "retires": 3})).unwrap_err();
        assert_eq!(e.field, "retires");
        assert!(e.message.contains("unknown field"));
    }

    #[test]
    fn names_the_mistyped_field() {
        let e = parse_settings::<S>(&serde_json::json!({"url": "x", "retries": "many"})).unwrap_err();
        assert_eq!(e.field, "retries");
    }

    #[test]
    fn names_the_missing_field() {
        let e = parse_settings::<S>(&serde_json::json!({})).unwrap_err();
        assert!(e.message.contains("missing field `url`"), "{e}");
        assert_eq!(e.field, "url");
    }

    #[test]
    fn a_json_body_is_parsed_in_one_pass_with_the_same_field_names() {
        assert_eq!(parse_json_body::<S>(br#"{"url": "x", "retries": 2}"#).unwrap().retries, 2);
        assert_eq!(parse_json_body::<S>(br#"{"url": "x", "retries": "many"}"#).unwrap_err().field, "retries");
        assert_eq!(parse_json_body::<S>(br#"{"url": "x", "retires": 1}"#).unwrap_err().field, "retires");
        assert_eq!(parse_json_body::<S>(br#"{}"#).unwrap_err().field, "url");
        for bad in [&b"{\"url\": "[..], b"not json", b"{\"url\": \"x\"} trailing", b""] {
            let e = parse_json_body::<S>(bad).unwrap_err();
            assert_eq!(e.field, "body", "{}", String::from_utf8_lossy(bad));
            assert!(e.message.starts_with("the body is not JSON"), "{e}");
        }
    }
}
