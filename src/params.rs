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
    /// A list of integers (class lists, per-class counts): `[0,1,2]` in keys.
    IntList(Vec<i64>),
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
            ParamValue::IntList(v) => format!("[{}]", v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")),
        }
    }

    pub fn as_int_list(&self) -> Option<&[i64]> {
        match self {
            ParamValue::IntList(v) => Some(v),
            _ => None,
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
            ParamValue::IntList(_) => "a list of integers",
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
    /// A list of `min_len..=max_len` integers, each in `[min, max]`.
    IntList {
        min: i64,
        max: i64,
        min_len: usize,
        max_len: usize,
    },
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
    IntList(&'static [i64]),
}

impl DefaultValue {
    pub fn value(&self) -> ParamValue {
        match *self {
            DefaultValue::Bool(b) => ParamValue::Bool(b),
            DefaultValue::Int(i) => ParamValue::Int(i),
            DefaultValue::Float(f) => ParamValue::Float(f),
            DefaultValue::Str(s) => ParamValue::Str(s.to_string()),
            DefaultValue::IntList(v) => ParamValue::IntList(v.to_vec()),
        }
    }
}

impl ParamDef {
    /// Check a value against this definition. Integers are accepted where floats are expected
    /// (`lr = 1` means 1.0). Returns the normalised value or a message and an optional hint.
    pub fn check(&self, v: &ParamValue, data_names: &[String]) -> Result<ParamValue, (String, Option<String>)> {
        if matches!(v, ParamValue::IntList(_)) && !matches!(self.kind, ParamKind::IntList { .. }) {
            return Err((format!("`{}` must be a single value", self.name), Some("lists of values belong in an experiment's `grid`".into())));
        }
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
            ParamKind::IntList { min, max, min_len, max_len } => {
                let list = v
                    .as_int_list()
                    .ok_or_else(|| (format!("`{}` must be a list of integers, found {}", self.name, v.type_name()), Some(format!("write `{} = [0, 1, 2]`: {}", self.name, self.doc))))?;
                if list.len() < *min_len || list.len() > *max_len {
                    return Err((format!("`{}` has {} entries", self.name, list.len()), Some(format!("{} takes {min_len} to {max_len} entries: {}", self.name, self.doc))));
                }
                if let Some((i, x)) = list.iter().enumerate().find(|(_, x)| **x < *min || **x > *max) {
                    return Err((format!("`{}`: entry {i} = {x} is out of range", self.name), Some(format!("each entry of {} must lie in [{min}, {max}]: {}", self.name, self.doc))));
                }
                Ok(v.clone())
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

/// A method's parameters as a typed struct: the struct (serde) is what the method's code reads,
/// [`ParamStruct::SCHEMA`] is what the spec layer validates against (types, ranges, choices,
/// defaults, documentation). [`Schema::check`] proves the two agree: the same names, every
/// default, choice and range bound decodes into the struct. The registry runs it when a method
/// is registered, so a field without a schema entry (or the reverse) cannot reach a run.
///
/// A field that some configurations do not read (see `Method::inactive`) is an `Option`. The
/// struct must not use `#[serde(flatten)]` (its fields could not be listed).
pub trait ParamStruct: serde::de::DeserializeOwned {
    /// One definition per field, in the order the documentation shows them.
    const SCHEMA: &'static [ParamDef];

    /// The run's resolved parameters as this struct.
    fn decode(params: &Params) -> Result<Self, String> {
        decode(params)
    }
}

/// What the spec layer and the registry know of a method's parameters: the definitions, and
/// the typed struct behind them (to check that the two agree).
#[derive(Clone, Copy)]
pub struct Schema {
    pub defs: &'static [ParamDef],
    fields: fn() -> Result<Vec<&'static str>, String>,
    decodes: fn(&Params) -> Result<(), String>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.defs.iter().map(|d| d.name)).finish()
    }
}

impl Schema {
    /// The schema of the typed struct `T`.
    pub fn of<T: ParamStruct>() -> Schema {
        Schema { defs: T::SCHEMA, fields: field_names::<T>, decodes: |p| decode::<T>(p).map(|_| ()) }
    }

    /// The definitions' defaults, as resolved parameters.
    pub fn defaults(&self) -> Params {
        self.defs.iter().map(|d| (d.name.to_string(), d.default.value())).collect()
    }

    /// Every disagreement between the definitions and the struct, one line each: a name on one
    /// side only, a default, choice or range bound the struct cannot hold, a default outside its
    /// own definition.
    pub fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        let fields = (self.fields)()?;
        for f in &fields {
            if !self.defs.iter().any(|d| d.name == *f) {
                problems.push(format!("field `{f}` has no definition in the schema"));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in self.defs {
            if !fields.contains(&d.name) {
                problems.push(format!("`{}` is defined in the schema but is no field of the struct", d.name));
            }
            if !seen.insert(d.name) {
                problems.push(format!("`{}` is defined twice", d.name));
            }
        }
        let defaults = self.defaults();
        if let Err(e) = (self.decodes)(&defaults) {
            problems.push(format!("the defaults do not decode: {e}"));
        }
        for d in self.defs {
            if let Err((m, _)) = d.check(&d.default.value(), &[d.default.value().canonical()]) {
                problems.push(format!("default of `{}`: {m}", d.name));
            }
            let admissible: Vec<ParamValue> = match &d.kind {
                ParamKind::Float { min, max, .. } => vec![ParamValue::Float(*min), ParamValue::Float(*max)],
                ParamKind::Int { min, max } => vec![ParamValue::Int(*min), ParamValue::Int(*max)],
                ParamKind::Choice(cs) => cs.iter().map(|c| ParamValue::Str(c.to_string())).collect(),
                ParamKind::Bool => vec![ParamValue::Bool(false), ParamValue::Bool(true)],
                ParamKind::DataName => vec![ParamValue::Str("any_data_set".into())],
                ParamKind::IntList { min, max, min_len, max_len } => vec![ParamValue::IntList(vec![*min; *min_len]), ParamValue::IntList(vec![*max; (*max_len).min(64)])],
            };
            for v in admissible {
                let mut p = defaults.clone();
                p.insert(d.name.to_string(), v.clone());
                if let Err(e) = (self.decodes)(&p) {
                    problems.push(format!("`{}` = {v} is admissible but does not decode: {e}", d.name));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl std::ops::Deref for Schema {
    type Target = [ParamDef];
    fn deref(&self) -> &[ParamDef] {
        self.defs
    }
}

/// Resolved parameters as the typed struct `T` (a message naming the parameter on failure).
pub fn decode<T: serde::de::DeserializeOwned>(params: &Params) -> Result<T, String> {
    let map: serde_json::Map<String, serde_json::Value> = params.iter().map(|(k, v)| (k.clone(), to_json(v))).collect();
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| format!("parameters do not fit their struct: {e}"))
}

fn to_json(v: &ParamValue) -> serde_json::Value {
    match v {
        ParamValue::Bool(b) => serde_json::Value::Bool(*b),
        ParamValue::Int(i) => serde_json::Value::from(*i),
        // Non-finite floats never pass the schema; null makes the decode fail if one did.
        ParamValue::Float(f) => serde_json::Number::from_f64(*f).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null),
        ParamValue::Str(s) => serde_json::Value::String(s.clone()),
        ParamValue::IntList(v) => serde_json::Value::Array(v.iter().map(|x| serde_json::Value::from(*x)).collect()),
    }
}

/// The field names of a struct, as its `Deserialize` implementation declares them.
fn field_names<T: serde::de::DeserializeOwned>() -> Result<Vec<&'static str>, String> {
    use serde::de::{self, Visitor};
    struct Fields(std::cell::Cell<Option<&'static [&'static str]>>);
    impl<'de> de::Deserializer<'de> for &Fields {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("the parameters are not a plain struct (is `flatten` used?)"))
        }
        fn deserialize_struct<V: Visitor<'de>>(self, _: &'static str, fields: &'static [&'static str], _: V) -> Result<V::Value, Self::Error> {
            self.0.set(Some(fields));
            Err(de::Error::custom("fields recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit unit_struct
            newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let rec = Fields(std::cell::Cell::new(None));
    match T::deserialize(&rec) {
        Ok(_) => Err("the parameters are not a struct".into()),
        Err(e) => rec.0.get().map(|f| f.to_vec()).ok_or_else(|| e.to_string()),
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

/// Convert a TOML value to a parameter value: a plain value, or a list of integers; other
/// arrays and tables are not parameters.
pub fn from_toml(v: &toml::Value) -> Option<ParamValue> {
    match v {
        toml::Value::Array(items) => items.iter().map(toml::Value::as_integer).collect::<Option<Vec<i64>>>().map(ParamValue::IntList),
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

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Good {
        lr: f64,
        epochs: usize,
        opt: Opt,
        momentum: Option<f64>,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Opt {
        Sgd,
        Adam,
    }

    const FLOAT: ParamKind = ParamKind::Float { min: 0.0, max: 1.0, min_exclusive: true };
    static GOOD: &[ParamDef] = &[
        ParamDef { name: "lr", kind: FLOAT, default: DefaultValue::Float(0.1), doc: "" },
        ParamDef { name: "epochs", kind: ParamKind::Int { min: 1, max: 10 }, default: DefaultValue::Int(3), doc: "" },
        ParamDef { name: "opt", kind: ParamKind::Choice(&["sgd", "adam"]), default: DefaultValue::Str("sgd"), doc: "" },
        ParamDef { name: "momentum", kind: FLOAT, default: DefaultValue::Float(0.9), doc: "" },
    ];

    impl ParamStruct for Good {
        const SCHEMA: &'static [ParamDef] = GOOD;
    }

    /// `Good` checked against other definitions than its own.
    fn check_with(defs: &'static [ParamDef]) -> Result<(), String> {
        Schema { defs, ..Schema::of::<Good>() }.check()
    }

    #[test]
    fn a_struct_and_its_schema_agree() {
        Schema::of::<Good>().check().unwrap();
        let p: Good = decode(&Schema::of::<Good>().defaults()).unwrap();
        assert_eq!((p.epochs, p.momentum), (3, Some(0.9)));
        // An inactive parameter left out of the run decodes as `None`.
        let mut q = Schema::of::<Good>().defaults();
        q.remove("momentum");
        assert_eq!(decode::<Good>(&q).unwrap().momentum, None);
    }

    #[test]
    fn every_disagreement_between_struct_and_schema_is_named() {
        // A field without a definition, and a definition without a field.
        static RENAMED: &[ParamDef] = &[
            ParamDef { name: "learning_rate", kind: FLOAT, default: DefaultValue::Float(0.1), doc: "" },
            ParamDef { name: "epochs", kind: ParamKind::Int { min: 1, max: 10 }, default: DefaultValue::Int(3), doc: "" },
            ParamDef { name: "opt", kind: ParamKind::Choice(&["sgd", "adam"]), default: DefaultValue::Str("sgd"), doc: "" },
            ParamDef { name: "momentum", kind: FLOAT, default: DefaultValue::Float(0.9), doc: "" },
        ];
        let e = check_with(RENAMED).unwrap_err();
        assert!(e.contains("field `lr` has no definition"), "{e}");
        assert!(e.contains("`learning_rate` is defined in the schema but is no field"), "{e}");
        // A choice the enum does not have, a range bound the field cannot hold, a default
        // outside its own range.
        static WIDER: &[ParamDef] = &[
            ParamDef { name: "lr", kind: FLOAT, default: DefaultValue::Float(2.0), doc: "" },
            ParamDef { name: "epochs", kind: ParamKind::Int { min: -1, max: 10 }, default: DefaultValue::Int(3), doc: "" },
            ParamDef { name: "opt", kind: ParamKind::Choice(&["sgd", "adam", "lion"]), default: DefaultValue::Str("sgd"), doc: "" },
            ParamDef { name: "momentum", kind: ParamKind::Bool, default: DefaultValue::Bool(true), doc: "" },
        ];
        let e = check_with(WIDER).unwrap_err();
        assert!(e.contains("`opt` = lion is admissible but does not decode"), "{e}");
        assert!(e.contains("`epochs` = -1 is admissible but does not decode"), "{e}");
        assert!(e.contains("default of `lr`: `lr` = 2.0 is out of range"), "{e}");
        assert!(e.contains("the defaults do not decode"), "{e}");
    }

    #[test]
    fn integer_lists_have_canonical_text_and_are_checked_entry_by_entry() {
        let v = from_toml(&toml::Value::Array(vec![toml::Value::Integer(3), toml::Value::Integer(0)])).unwrap();
        assert_eq!(v.canonical(), "[3,0]");
        assert_eq!(ParamValue::IntList(vec![]).canonical(), "[]");
        assert_eq!(from_toml(&toml::Value::Array(vec![toml::Value::Integer(1), toml::Value::Float(2.0)])), None);
        let def = ParamDef { name: "classes", kind: ParamKind::IntList { min: 0, max: 9, min_len: 1, max_len: 10 }, default: DefaultValue::IntList(&[0, 1]), doc: "class list" };
        assert_eq!(def.check(&v, &[]).unwrap(), v);
        let (m, _) = def.check(&ParamValue::IntList(vec![1, 12, 3]), &[]).unwrap_err();
        assert_eq!(m, "`classes`: entry 1 = 12 is out of range");
        let (m, _) = def.check(&ParamValue::IntList(vec![]), &[]).unwrap_err();
        assert_eq!(m, "`classes` has 0 entries");
        let (m, h) = def.check(&ParamValue::Int(3), &[]).unwrap_err();
        assert_eq!(m, "`classes` must be a list of integers, found an integer");
        assert!(h.unwrap().contains("classes = [0, 1, 2]"));
        // A list decodes into a Vec field.
        #[derive(serde::Deserialize)]
        struct L {
            classes: Vec<u32>,
        }
        impl ParamStruct for L {
            const SCHEMA: &'static [ParamDef] = &[ParamDef { name: "classes", kind: ParamKind::IntList { min: 0, max: 9, min_len: 1, max_len: 10 }, default: DefaultValue::IntList(&[0, 1]), doc: "" }];
        }
        Schema::of::<L>().check().unwrap();
        assert_eq!(decode::<L>(&Params::from([("classes".to_string(), v)])).unwrap().classes, vec![3, 0]);
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
