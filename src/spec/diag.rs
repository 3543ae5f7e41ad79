//! Diagnostics: what is wrong, where (file:line:col or the `--set` that caused it), and a hint.
//!
//! The kind of problem (the message) is kept apart from its location, and one error carries
//! every problem found, so a user fixes a spec in one pass.

use std::fmt;
use std::ops::Range;

/// Where a problem is.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A span of the spec file.
    File { path: String, line: usize, col: usize, source_line: String },
    /// The spec file as a whole (no finer place is known).
    FileOnly { path: String },
    /// A command-line override.
    Override { arg: String },
    /// A command-line argument other than `--set`, e.g. `--profile x`.
    Argument { arg: String },
    /// An entry of a profile in the spec file.
    Profile { name: String, path: String, line: usize, col: usize },
}

/// One problem.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub origin: Origin,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        match &self.origin {
            Origin::File { path, line, col, source_line } => {
                writeln!(f, "  --> {path}:{line}:{col}")?;
                let gutter = line.to_string().len();
                writeln!(f, "{:gutter$} |", "")?;
                writeln!(f, "{line} | {source_line}")?;
                writeln!(f, "{:gutter$} | {:>width$}", "", "^", width = *col)?;
            }
            Origin::FileOnly { path } => writeln!(f, "  --> {path}")?,
            Origin::Override { arg } => writeln!(f, "  --> in the override `--set {arg}`")?,
            Origin::Argument { arg } => writeln!(f, "  --> in the argument `{arg}`")?,
            Origin::Profile { name, path, line, col } => writeln!(f, "  --> {path}:{line}:{col} (profile `{name}`)")?,
        }
        if let Some(h) = &self.hint {
            writeln!(f, "  = hint: {h}")?;
        }
        Ok(())
    }
}

/// Every problem of one spec.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.diagnostics {
            write!(f, "{d}")?;
        }
        let n = self.diagnostics.len();
        write!(f, "{n} problem{} in the spec", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for SpecError {}

/// Maps byte offsets of a text to 1-based line and column.
pub struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, starts }
    }

    /// (line, column, the text of the line), 1-based, column counted in characters.
    pub fn locate(&self, offset: usize) -> (usize, usize, String) {
        let line = match self.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let start = self.starts[line];
        let end = self.starts.get(line + 1).map_or(self.text.len(), |e| e.saturating_sub(1));
        let end = end.max(start).min(self.text.len());
        let src = self.text.get(start..end).unwrap_or("").trim_end_matches('\r').to_string();
        let col = self.text.get(start..offset.min(self.text.len())).map_or(1, |s| s.chars().count() + 1);
        (line + 1, col, src)
    }

    pub fn origin(&self, path: &str, span: Option<Range<usize>>) -> Origin {
        match span {
            Some(r) => {
                let (line, col, source_line) = self.locate(r.start);
                Origin::File { path: path.to_string(), line, col, source_line }
            }
            None => Origin::FileOnly { path: path.to_string() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns() {
        let idx = LineIndex::new("a = 1\nbb = 2\n");
        assert_eq!(idx.locate(0), (1, 1, "a = 1".into()));
        assert_eq!(idx.locate(8), (2, 3, "bb = 2".into()));
    }
}
