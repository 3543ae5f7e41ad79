//! Typed parameter values and the schemas that methods declare for them.
//!
//! Specs give parameters as TOML values; every method declares a schema (name, type, range,
//! default, documentation) and the spec layer validates against it, so a typo or an impossible
//! value is reported at its place in the file. Resolved parameters are a sorted map of
//! `ParamValue`s whose canonical text (floats in Rust's shortest round-trip form) is what goes
//! into cache keys.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One resolved parameter value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl ParamValue {
    /// The canonical text of the value, stable across platforms and versions: what keys hash
    /// and what reports print. Floats use the shortest text that round-trips (`0.01`, `1e-5`
    /// prints as `0.00001`), always with a decimal point so `1.0` never reads as the integer 1.
    pub fn canonical(&self) -> String {
        match self {
            ParamValue::Bool(b) => b.to_string(),
            ParamValue::Int(i) => i.to_string(),
            ParamValue::Float(f) => canonical_float(*f),
            ParamValue::Str(s) => s.clone(),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            ParamValue::Float(f) => Some(*f),
            ParamValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            ParamValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            ParamValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            ParamValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The kind of value, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            ParamValue::Bool(_) => "a boolean",
            ParamValue::Int(_) => "an integer",
            ParamValue::Float(_) => "a float",
            ParamValue::Str(_) => "a string",
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// Shortest round-trip text of a float, with a decimal point for integral values.
pub fn canonical_float(f: f64) -> String {
    if f == 0.0 {
        return "0.0".to_string(); // also folds -0.0, which no parameter means differently
    }
    let s = format!("{f}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// Resolved parameters of one cell, sorted by name.
pub type Params = BTreeMap<String, ParamValue>;

/// The type and admissible values of one parameter.
#[derive(Debug, Clone)]
pub enum ParamKind {
    /// A float in `[min, max]`, or `(min, max]` when `min_exclusive`.
    Float {
        min: f64,
        max: f64,
        min_exclusive: bool,
    },
    /// An integer in `[min, max]`.
    Int {
        min: i64,
        max: i64,
    },
    /// One of a fixed list of names.
    Choice(&'static [&'static str]),
    /// The name of a data set declared in the spec's `[data]` section.
    DataName,
    Bool,
}

/// One parameter of a method: its name, type, default and what it means.
#[derive(Debug, Clone)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
    pub default: DefaultValue,
    pub doc: &'static str,
}

/// A default that can live in a `static` schema.
#[derive(Debug, Clone, Copy)]
pub enum DefaultValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'static str),
}

impl DefaultValue {
    pub fn value(&self) -> ParamValue {
        match *self {
            DefaultValue::Bool(b) => ParamValue::Bool(b),
            DefaultValue::Int(i) => ParamValue::Int(i),
            DefaultValue::Float(f) => ParamValue::Float(f),
            DefaultValue::Str(s) => ParamValue::Str(s.to_string()),
        }
    }
}

impl ParamDef {
    /// Check a value against this definition. Integers are accepted where floats are expected
    /// (`lr = 1` means 1.0). Returns the normalised value or a message and an optional hint.
    pub fn check(&self, v: &ParamValue, data_names: &[String]) -> Result<ParamValue, (String, Option<String>)> {
        match &self.kind {
            ParamKind::Float { min, max, min_exclusive } => {
                let x = match v {
                    ParamValue::Float(f) => *f,
                    ParamValue::Int(i) => *i as f64,
                    other => return Err((format!("`{}` must be a number, found {}", self.name, other.type_name()), None)),
                };
                let low_ok = if *min_exclusive { x > *min } else { x >= *min };
                if !x.is_finite() || !low_ok || x > *max {
                    let lo = if *min_exclusive { "(" } else { "[" };
                    return Err((
                        format!("`{}` = {} is out of range", self.name, canonical_float(x)),
                        Some(format!("{} must lie in {lo}{}, {}]: {}", self.name, canonical_float(*min), canonical_float(*max), self.doc)),
                    ));
                }
                Ok(ParamValue::Float(x))
            }
            ParamKind::Int { min, max } => {
                let x = match v {
                    ParamValue::Int(i) => *i,
                    other => return Err((format!("`{}` must be an integer, found {}", self.name, other.type_name()), None)),
                };
                if x < *min || x > *max {
                    return Err((format!("`{}` = {x} is out of range", self.name), Some(format!("{} must lie in [{min}, {max}]: {}", self.name, self.doc))));
                }
                Ok(ParamValue::Int(x))
            }
            ParamKind::Bool => match v {
                ParamValue::Bool(_) => Ok(v.clone()),
                other => Err((format!("`{}` must be true or false, found {}", self.name, other.type_name()), None)),
            },
            ParamKind::Choice(choices) => {
                let s = v.as_str().ok_or_else(|| (format!("`{}` must be a string, found {}", self.name, v.type_name()), None))?;
                if choices.contains(&s) {
                    Ok(v.clone())
                } else {
                    let names: Vec<String> = choices.iter().map(|c| c.to_string()).collect();
                    Err((format!("unknown {} `{s}`", self.name), Some(suggest(s, &names))))
                }
            }
            ParamKind::DataName => {
                let s = v.as_str().ok_or_else(|| (format!("`{}` must be a string, found {}", self.name, v.type_name()), None))?;
                if data_names.iter().any(|d| d == s) {
                    Ok(v.clone())
                } else {
                    Err((format!("unknown data set `{s}`"), Some(suggest(s, data_names))))
                }
            }
        }
    }
}

/// A hint naming the closest candidate ("did you mean `mnist`?") or, when none is close, the
/// full list of candidates.
pub fn suggest(word: &str, candidates: &[String]) -> String {
    let best = candidates.iter().map(|c| (levenshtein(word, c), c)).min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    match best {
        Some((d, c)) if d <= (word.len().max(2) / 2).max(2) => format!("did you mean `{c}`?"),
        _ => {
            let list: Vec<String> = candidates.iter().map(|c| format!("`{c}`")).collect();
            format!("expected one of {}", list.join(", "))
        }
    }
}

/// Edit distance (insertions, deletions, substitutions) between two strings, by characters.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Convert a TOML value to a parameter value; arrays and tables are not parameters.
pub fn from_toml(v: &toml::Value) -> Option<ParamValue> {
    match v {
        toml::Value::Boolean(b) => Some(ParamValue::Bool(*b)),
        toml::Value::Integer(i) => Some(ParamValue::Int(*i)),
        toml::Value::Float(f) => Some(ParamValue::Float(*f)),
        toml::Value::String(s) => Some(ParamValue::Str(s.clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_floats_are_stable() {
        assert_eq!(canonical_float(1.0), "1.0");
        assert_eq!(canonical_float(0.01), "0.01");
        assert_eq!(canonical_float(-0.0), "0.0");
        assert_eq!(canonical_float(5e-4), "0.0005");
        assert_eq!(ParamValue::Int(3).canonical(), "3");
    }

    #[test]
    fn suggestions() {
        let c = vec!["mnist".to_string(), "optdigits".to_string()];
        assert_eq!(suggest("minst", &c), "did you mean `mnist`?");
        assert_eq!(suggest("cifar", &c), "expected one of `mnist`, `optdigits`");
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }

    #[test]
    fn range_checks() {
        let def = ParamDef { name: "imbalance", kind: ParamKind::Float { min: 0.0, max: 1.0, min_exclusive: true }, default: DefaultValue::Float(0.01), doc: "n_min / n_max" };
        assert!(def.check(&ParamValue::Float(0.0), &[]).is_err());
        assert!(def.check(&ParamValue::Float(1.5), &[]).is_err());
        assert_eq!(def.check(&ParamValue::Int(1), &[]).unwrap(), ParamValue::Float(1.0));
        assert!(def.check(&ParamValue::Str("x".into()), &[]).is_err());
    }
}
