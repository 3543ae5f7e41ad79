//! Find the span of a dotted path (`experiments.exp2.grid.imbalance`, `tables.0.metrics.1`)
//! in the spec's source text, so semantic errors found after parsing still point at the file.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

/// Spans of a parsed spec text.
pub struct Locator {
    doc: Option<ImDocument<String>>,
}

/// A place in the document: toml_edit gives tables, items and values distinct types.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    /// The child at `seg` with the span of its key (or of the element, for arrays).
    fn child(self, seg: &str) -> Option<(Option<Range<usize>>, Node<'a>)> {
        match self {
            Node::Item(Item::Table(t)) | Node::Table(t) => t.get_key_value(seg).map(|(k, v)| (k.span(), Node::Item(v))),
            Node::Item(Item::ArrayOfTables(a)) => {
                let t = a.get(seg.parse::<usize>().ok()?)?;
                Some((t.span(), Node::Table(t)))
            }
            Node::Item(Item::Value(v)) | Node::Value(v) => match v {
                Value::InlineTable(t) => t.get_key_value(seg).map(|(k, v)| (k.span(), Node::Item(v))),
                Value::Array(a) => {
                    let e = a.get(seg.parse::<usize>().ok()?)?;
                    Some((e.span(), Node::Value(e)))
                }
                _ => None,
            },
            _ => None,
        }
    }

    fn value_span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(Item::Value(v)) | Node::Value(v) => v.span(),
            _ => None,
        }
    }
}

impl Locator {
    pub fn new(text: &str) -> Self {
        Locator { doc: ImDocument::parse(text.to_string()).ok() }
    }

    /// The span of the value at `path`; where the path ends early (a missing key), the span of
    /// the deepest part that exists.
    pub fn span(&self, path: &[String]) -> Option<Range<usize>> {
        self.walk(path, false)
    }

    /// The span of the key itself at `path` (for "unknown key" messages).
    pub fn key_span(&self, path: &[String]) -> Option<Range<usize>> {
        self.walk(path, true)
    }

    fn walk(&self, path: &[String], want_key: bool) -> Option<Range<usize>> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Item(doc.as_item());
        let mut best = None;
        let mut complete = true;
        for seg in path {
            match node.child(seg) {
                Some((span, next)) => {
                    if span.is_some() {
                        best = span;
                    }
                    node = next;
                }
                None => {
                    complete = false;
                    break;
                }
            }
        }
        if complete && !want_key {
            if let Some(s) = node.value_span() {
                best = Some(s);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('.').map(String::from).collect()
    }

    #[test]
    fn spans_of_nested_paths() {
        let text = "[a]\nb = 1\nc = { d = [1, 2] }\n[[t]]\nx = \"y\"\n";
        let l = Locator::new(text);
        assert_eq!(&text[l.span(&p("a.b")).unwrap()], "1");
        assert_eq!(&text[l.span(&p("a.c.d.1")).unwrap()], "2");
        assert_eq!(&text[l.key_span(&p("a.c")).unwrap()], "c");
        assert_eq!(&text[l.span(&p("t.0.x")).unwrap()], "\"y\"");
        // A missing key points at the deepest part that exists.
        assert_eq!(&text[l.span(&p("a.zzz")).unwrap()], "a");
    }
}
