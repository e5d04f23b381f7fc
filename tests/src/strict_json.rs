//! A strict reading of JSON log lines: a key that appears twice in one object is an
//! error (log shippers keep one of the two, or reject the line), as is anything that is
//! not one JSON object.

use std::{collections::HashSet, fmt};

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// `Ok` if `line` is one JSON object whose objects, at every depth, have unique keys.
pub fn check(line: &str) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_str(line);
    de.deserialize_map(Strict).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())
}

struct Strict;

impl<'de> de::DeserializeSeed<'de> for Strict {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value_seed(Strict)?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Strict)?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_errors_at_any_depth() {
        assert!(check(r#"{"a":1,"span":{"name":"x","task":"y"},"l":[{"k":1}]}"#).is_ok());
        assert!(check(r#"{"target":"a","target":"b"}"#).is_err());
        assert!(check(r#"{"span":{"name":"task","name":"watch"}}"#).is_err());
        assert!(check(r#"{"l":[{"k":1,"k":2}]}"#).is_err());
        assert!(check(r#"{"a":1} trailing"#).is_err());
        assert!(check("not json").is_err());
    }
}
