//! `nbexec NOTEBOOK [--out EXECUTED.ipynb]`: run a Jupyter notebook's code cells, in order,
//! through evcxr's `CommandContext` (what the evcxr Jupyter kernel runs each cell with), from
//! the notebook's folder as a kernel would. Exit 1 on the first cell that fails: a compile
//! error, a `?` error or a panic (evcxr reports both on the cell's standard error), or a cell
//! whose metadata says it shows something (`reprise.shows`) that displayed no HTML.
//! `--out` writes the notebook back with every cell's outputs, as `jupyter nbconvert --execute`
//! would.
//!
//! Set EVCXR_TMPDIR to keep evcxr's build folder (and so its compiled dependencies) between
//! runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Args {
    notebook: PathBuf,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut notebook = None;
    let mut out = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a path")?)),
            "-h" | "--help" => return Err(String::new()),
            _ if notebook.is_none() => notebook = Some(PathBuf::from(a)),
            _ => return Err(format!("unexpected argument `{a}`")),
        }
    }
    Ok(Args { notebook: notebook.ok_or("no notebook given")?, out })
}

fn source_text(cell: &Value) -> String {
    match &cell["source"] {
        Value::String(s) => s.clone(),
        Value::Array(lines) => lines.iter().filter_map(Value::as_str).collect(),
        _ => String::new(),
    }
}

/// Lines a cell printed, collected by a thread per stream.
type Lines = Arc<Mutex<Vec<String>>>;

fn take(lines: &Lines) -> Vec<String> {
    lines.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
}

fn main() -> ExitCode {
    // evcxr runs cells in a child process that is this same binary: this call turns that child
    // into the evcxr runtime and never returns there.
    evcxr::runtime_hook();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{}usage: nbexec NOTEBOOK.ipynb [--out EXECUTED.ipynb]", if e.is_empty() { String::new() } else { format!("error: {e}\n") });
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Let the evcxr child process find the standard library's shared object. evcxr links each
/// cell with `-C prefer-dynamic` and relies on an rpath relative to its build folder, which
/// misses the toolchain when EVCXR_TMPDIR and rustup's home share a parent folder below the
/// file-system root (e.g. both under $HOME): the child's `dlopen` then fails.
fn find_std_dylib() {
    let Ok(out) = std::process::Command::new("rustc").args(["--print", "target-libdir"]).output() else { return };
    let libdir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if libdir.is_empty() {
        return;
    }
    let current = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    if !current.split(':').any(|p| p == libdir) {
        let joined = if current.is_empty() { libdir } else { format!("{libdir}:{current}") };
        // Still single-threaded here: no other thread reads the environment.
        std::env::set_var("LD_LIBRARY_PATH", joined);
    }
}

/// Run every code cell; Ok(false) when one failed.
fn run(args: &Args) -> Result<bool, String> {
    let path = std::fs::canonicalize(&args.notebook).map_err(|e| format!("{}: {e}", args.notebook.display()))?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut nb: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let out = args.out.as_ref().map(|o| std::env::current_dir().map(|d| d.join(o)).unwrap_or_else(|_| o.clone()));
    // A kernel's working directory is the notebook's folder; relative paths in cells (`:dep`
    // paths among them) are read from there.
    let dir = path.parent().unwrap_or(Path::new("."));
    std::env::set_current_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    let start = Instant::now();
    find_std_dylib();
    let (mut ctx, outputs) = evcxr::CommandContext::new().map_err(|e| format!("starting evcxr: {e}"))?;
    eprintln!("nbexec: evcxr started in {:.1} s (EVCXR_TMPDIR={})", start.elapsed().as_secs_f64(), std::env::var("EVCXR_TMPDIR").unwrap_or_else(|_| "a temporary folder".into()));
    let (stdout, stderr): (Lines, Lines) = Default::default();
    for (rx, sink, echo_err) in [(outputs.stdout, stdout.clone(), false), (outputs.stderr, stderr.clone(), true)] {
        std::thread::spawn(move || {
            while let Ok(line) = rx.recv() {
                if echo_err {
                    eprintln!("  ! {line}");
                } else {
                    println!("  | {line}");
                }
                if let Ok(mut v) = sink.lock() {
                    v.push(line);
                }
            }
        });
    }

    let cells = nb["cells"].as_array_mut().ok_or_else(|| format!("{}: no `cells` list", path.display()))?;
    let (mut passed, mut failed, mut count) = (0usize, 0usize, 0u64);
    for cell in cells.iter_mut().filter(|c| c["cell_type"] == "code") {
        count += 1;
        let code = source_text(cell);
        let first = code.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        eprintln!("[{count}] {first}");
        let t = Instant::now();
        let result = ctx.execute(&code);
        // The child's standard error arrives on its own thread; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        let (out_lines, err_lines) = (take(&stdout), take(&stderr));
        let mut cell_outputs = Vec::new();
        if !out_lines.is_empty() {
            cell_outputs.push(json!({"output_type": "stream", "name": "stdout", "text": out_lines.iter().map(|l| format!("{l}\n")).collect::<Vec<_>>()}));
        }
        if !err_lines.is_empty() {
            cell_outputs.push(json!({"output_type": "stream", "name": "stderr", "text": err_lines.iter().map(|l| format!("{l}\n")).collect::<Vec<_>>()}));
        }
        let problem = match &result {
            Err(e) => Some(format!("{e}")),
            Ok(_) if !err_lines.is_empty() => Some("the cell wrote to standard error (a `?` error or a panic)".to_string()),
            Ok(o) => match cell["metadata"]["reprise"]["shows"].as_str() {
                Some(what) if !o.content_by_mime_type.contains_key("text/html") => Some(format!("the cell should show {what} as HTML but displayed nothing")),
                _ => None,
            },
        };
        if let Ok(o) = &result {
            if !o.content_by_mime_type.is_empty() {
                let mut data = serde_json::Map::new();
                let mut mimes: Vec<_> = o.content_by_mime_type.iter().collect();
                mimes.sort();
                for (mime, content) in mimes {
                    data.insert(mime.clone(), json!(content));
                }
                cell_outputs.push(json!({"output_type": "execute_result", "execution_count": count, "data": data, "metadata": {}}));
            }
        }
        let kinds: Vec<&str> = result.as_ref().map(|o| o.content_by_mime_type.keys().map(String::as_str).collect()).unwrap_or_default();
        match problem {
            None => {
                passed += 1;
                eprintln!("    ok in {:.1} s{}", t.elapsed().as_secs_f64(), if kinds.is_empty() { String::new() } else { format!(", shows {}", kinds.join(" + ")) });
            }
            Some(p) => {
                failed += 1;
                eprintln!("    FAILED in {:.1} s: {p}", t.elapsed().as_secs_f64());
                cell_outputs.push(json!({"output_type": "error", "ename": "CellError", "evalue": p, "traceback": []}));
            }
        }
        cell["outputs"] = json!(cell_outputs);
        cell["execution_count"] = json!(count);
        if failed > 0 {
            break;
        }
    }
    if let Some(out) = out {
        let text = serde_json::to_string_pretty(&nb).map_err(|e| e.to_string())?;
        std::fs::write(&out, text + "\n").map_err(|e| format!("{}: {e}", out.display()))?;
        eprintln!("nbexec: wrote {}", out.display());
    }
    println!("nbexec: {passed} passed, {failed} failed in {:.0} s", start.elapsed().as_secs_f64());
    Ok(failed == 0)
}
