//! What the binaries' own code says, read as text by tests: the metric names it registers.

use std::path::Path;

/// Every metric name the server, agent and common code register (`"podiam_..."` string
/// literals), each with the source text that follows it (where its label names are).
pub fn registered_metrics() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = Vec::new();
    for dir in ["server/src", "agent/src", "common/src"] {
        walk(&root.join(dir), &mut out);
    }
    out
}

fn walk(dir: &Path, out: &mut Vec<(String, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if path.is_dir() {
            walk(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for (i, _) in text.match_indices("\"podiam_") {
            let rest = &text[i + 1..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // Not metrics: serde function names (`deserialize_with = "podiam_..."`).
            let serde = text[..i].trim_end().ends_with("deserialize_with =");
            if rest[name.len()..].starts_with('"') && !serde {
                let mut end = (i + 700).min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                out.push((name, text[i..end].to_string()));
            }
        }
    }
}
