//! What commands print on stdout: JSON with `--json` (or where the data has no better shape), else aligned tables
//! and `key  value` lines for a person. Nothing here writes control characters.

use serde_json::Value;

use crate::progress::plain;

pub fn json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A JSON value as a table cell: strings bare, `null` as `-`, the rest as JSON.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => plain(s),
        other => plain(&other.to_string()),
    }
}

/// Bytes as a person reads them (1024-based, one decimal).
pub fn size(value: &Value) -> String {
    let Some(bytes) = value.as_f64() else {
        return "-".into();
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut amount = bytes;
    let mut unit = 0;
    while amount >= 1024.0 && unit + 1 < units.len() {
        amount /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{amount:.1} {}", units[unit])
    }
}

/// Rows under headers, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push('\n');
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec!["db1".to_string(), "shared".to_string(), "ok".to_string()],
            vec!["a-longer-id".to_string(), "ha".to_string(), "-".to_string()],
        ];
        assert_eq!(
            table(&["ID", "PLAN", "STATE"], &rows),
            "ID           PLAN    STATE\ndb1          shared  ok\na-longer-id  ha      -"
        );
    }

    #[test]
    fn cells_and_sizes() {
        assert_eq!(cell(&Value::Null), "-");
        assert_eq!(cell(&json!("a\nb")), "a b");
        assert_eq!(cell(&json!(3)), "3");
        assert_eq!(size(&json!(512)), "512 B");
        assert_eq!(size(&json!(1536)), "1.5 KiB");
        assert_eq!(size(&json!(3 * 1024 * 1024 * 1024u64)), "3.0 GiB");
        assert_eq!(size(&Value::Null), "-");
    }
}
