//! Rich display: what each notebook value shows as, in MIME types a Jupyter front end picks
//! from (HTML first, plain text as the fallback), and the `evcxr_display` method through which
//! evcxr finds it.
//!
//! evcxr calls `evcxr_display(&self)` on a cell's last expression when the type has such a
//! method; the method prints one `EVCXR_BEGIN_CONTENT <mime>` … `EVCXR_END_CONTENT` block per
//! type to standard output, and the kernel turns the blocks into one display. HTML outputs carry
//! the report's own table, figure and claim styles, scoped to a `reprise` element so that they
//! leave the rest of the notebook alone.

use polars::prelude::{AnyValue, DataFrame};

use super::{Cells, Claim, Claims, Figure, Frame, Rendered, Report, Table};
use crate::render::{self, claims, table::esc};

/// Rows of a frame an HTML display shows; `Frame::head(n)` shows other counts.
const FRAME_ROWS: usize = 20;

/// One display's content in several MIME types, richest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bundle(pub Vec<(&'static str, String)>);

impl Bundle {
    fn new(html: String, text: String) -> Bundle {
        Bundle(vec![("text/html", wrap_html(&html)), ("text/plain", text)])
    }

    /// The content of one MIME type.
    pub fn get(&self, mime: &str) -> Option<&str> {
        self.0.iter().find(|(m, _)| *m == mime).map(|(_, c)| c.as_str())
    }

    /// The blocks evcxr reads from a cell's standard output.
    pub fn evcxr_text(&self) -> String {
        self.0.iter().map(|(mime, content)| format!("EVCXR_BEGIN_CONTENT {mime}\n{}\nEVCXR_END_CONTENT\n", content.trim_end_matches('\n'))).collect()
    }
}

/// The component styles of the HTML report, each selector prefixed with `.reprise `.
fn scoped_css() -> String {
    render::COMPONENT_CSS
        .split('}')
        .filter_map(|rule| rule.split_once('{'))
        .map(|(selectors, body)| {
            let scoped: Vec<String> = selectors.split(',').map(|s| format!(".reprise {}", s.trim())).collect();
            format!("{}{{{body}}}", scoped.join(","))
        })
        .collect()
}

fn wrap_html(body: &str) -> String {
    format!("<div class=\"reprise\"><style>{}</style>{body}</div>", scoped_css())
}

/// Gives each type the method evcxr looks for.
macro_rules! evcxr_display {
    ($($t:ty),*) => {$(
        impl $t {
            /// Show this value in evcxr (Jupyter): HTML, with plain text as the fallback.
            pub fn evcxr_display(&self) {
                print!("{}", self.bundle().evcxr_text());
            }
        }
    )*};
}

evcxr_display!(Report, Cells, Frame, Table, Figure, Claim, Claims, Rendered);

impl Report {
    /// A summary: title, profile, cache, cell counts, and the tables, figures and claims.
    pub fn bundle(&self) -> Bundle {
        let cells = self.cells();
        let failed = cells.iter().filter(|c| c.status != "cached").count();
        let claims = self.claims();
        let holding = claims.0.iter().filter(|c| c.holds()).count();
        let overrides = if self.spec.overrides.is_empty() { "none".to_string() } else { self.spec.overrides.join(", ") };
        let facts = [
            ("report", self.id().to_string()),
            ("spec", self.spec.path.display().to_string()),
            ("profile", self.profile().to_string()),
            ("overrides", overrides),
            ("cache", self.store_dir().display().to_string()),
            ("cells", format!("{} cached ({failed} recorded as failed)", cells.len())),
            ("tables", self.table_ids().join(", ")),
            ("figures", self.figure_ids().join(", ")),
            ("claims", format!("{holding} of {} hold at this scale", claims.0.len())),
        ];
        let rows: String = facts.iter().map(|(k, v)| format!("<tr><th>{k}</th><td>{}</td></tr>", esc(v))).collect();
        let html = format!("<p><b>{}</b></p><table><tbody>{rows}</tbody></table>", esc(self.title()));
        let text = std::iter::once(self.title().to_string()).chain(facts.iter().map(|(k, v)| format!("{k}: {v}"))).collect::<Vec<_>>().join("\n");
        Bundle::new(html, text)
    }
}

impl Cells {
    pub fn bundle(&self) -> Bundle {
        let secs = |s: Option<f64>| s.map_or_else(|| "–".to_string(), |s| format!("{s:.1}"));
        let mut html = String::from("<table><thead><tr><th>cell</th><th>kind</th><th>status</th><th>seconds</th><th>key</th></tr></thead><tbody>");
        let mut text = String::new();
        for c in self.iter() {
            let short = c.key.get(..12).unwrap_or(&c.key);
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td title=\"{}\"><code>{short}</code></td></tr>",
                esc(&c.name),
                c.kind,
                esc(&c.status),
                secs(c.seconds),
                esc(&c.key)
            ));
            text.push_str(&format!("{:<8} {short}  {}  {}\n", c.status, c.kind, c.name));
        }
        html.push_str("</tbody></table>");
        Bundle::new(html, text)
    }
}

/// A frame value as text (strings without quotes, nulls as `null`).
fn cell_text(v: AnyValue) -> String {
    match v {
        AnyValue::Null => "null".to_string(),
        AnyValue::String(s) => s.to_string(),
        AnyValue::StringOwned(s) => s.to_string(),
        v => v.to_string(),
    }
}

/// The first `rows` rows of `df` as an HTML table, each header with its type.
fn frame_html(df: &DataFrame, rows: usize) -> String {
    let mut html = String::from("<table><thead><tr>");
    for c in df.columns() {
        html.push_str(&format!("<th>{}<br><small>{}</small></th>", esc(c.name()), esc(&c.dtype().to_string())));
    }
    html.push_str("</tr></thead><tbody>");
    for i in 0..df.height().min(rows) {
        html.push_str("<tr>");
        for c in df.columns() {
            let v = c.get(i).map(cell_text).unwrap_or_else(|e| format!("({e})"));
            let class = if c.dtype().is_primitive_numeric() { " class=\"num\"" } else { "" };
            html.push_str(&format!("<td{class}>{}</td>", esc(&v)));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    html
}

impl Frame {
    pub fn bundle(&self) -> Bundle {
        let (h, w) = self.df.shape();
        let mut html = format!("<p><b>{}</b>: {h} rows × {w} columns</p>{}", esc(&self.name), frame_html(&self.df, FRAME_ROWS));
        if h > FRAME_ROWS {
            html.push_str(&format!("<p class=\"caption\">… {} more rows (<code>.head(n)</code> shows n; the frame itself is a polars DataFrame)</p>", h - FRAME_ROWS));
        }
        Bundle::new(html, format!("{}: {}", self.name, self.df))
    }
}

impl Table {
    pub fn bundle(&self) -> Bundle {
        Bundle::new(render::table::html(&self.table, &self.profile), render::table::markdown(&self.table))
    }
}

impl Figure {
    pub fn bundle(&self) -> Bundle {
        Bundle::new(render::figure_html(&self.id, &self.title, &self.svg), format!("Figure {}: {}", self.id, self.title))
    }
}

impl Claim {
    pub fn bundle(&self) -> Bundle {
        Bundle::new(claims::html(&self.0), claims::markdown(&self.0))
    }
}

impl Claims {
    pub fn bundle(&self) -> Bundle {
        Bundle::new(self.0.iter().map(claims::html).collect(), self.0.iter().map(claims::markdown).collect::<Vec<_>>().join("\n"))
    }
}

impl Rendered {
    pub fn bundle(&self) -> Bundle {
        let r = &self.rendered;
        let files: Vec<String> = [&r.markdown, &r.html].into_iter().chain(&r.figures).chain(&r.tables).chain(&self.frames).map(|p| p.display().to_string()).collect();
        let html = format!("<p>Rendered {} files:</p><ul>{}</ul>", files.len(), files.iter().map(|f| format!("<li><code>{}</code></li>", esc(f))).collect::<String>());
        Bundle::new(html, format!("rendered:\n{}", files.join("\n")))
    }
}
