//! The report for people.

use std::fmt::Write;

use accord_engine::{InsertPolicy, TableDef};
use accord_schema_annotations::{Checked, Problem};

pub fn render(checked: &Checked) -> String {
    let mut out = String::new();
    let tables = checked.policy.tables();
    if tables.is_empty() {
        out.push_str(
            "No replicated tables. A table takes part when its comment holds `@accord replicate`:\n  \
             COMMENT ON TABLE shop.products IS '@accord replicate';\n",
        );
    } else {
        let _ = writeln!(out, "Replicated tables ({}):", tables.len());
        for table in tables {
            out.push('\n');
            render_table(&mut out, table);
        }
    }

    let errors: Vec<&Problem> = checked.errors().collect();
    let warnings: Vec<&Problem> = checked.warnings().collect();
    render_problems(&mut out, "error", &errors);
    render_problems(&mut out, "warning", &warnings);

    out.push('\n');
    if errors.is_empty() {
        let _ = writeln!(
            out,
            "OK: no errors, {}. Policy fingerprint: {}",
            count(warnings.len(), "warning"),
            checked.policy.fingerprint()
        );
    } else {
        let _ = writeln!(
            out,
            "FAILED: {}, {}. A table with an error is not replicated until it is fixed.",
            count(errors.len(), "error"),
            count(warnings.len(), "warning")
        );
    }
    out
}

fn render_table(out: &mut String, table: &TableDef) {
    match table.inserts {
        InsertPolicy::Merge => {
            let _ = writeln!(out, "  {}", table.name);
        }
        InsertPolicy::Review => {
            let _ = writeln!(
                out,
                "  {}  (inserts=review: of two concurrent inserts of one key the earlier keeps the row, the other \
                 goes to the review queue)",
                table.name
            );
        }
    }
    let rows: Vec<[String; 3]> = table
        .key
        .iter()
        .map(|k| [k.name.clone(), k.ty.to_string(), "primary key".to_string()])
        .chain(
            table
                .columns
                .iter()
                .map(|c| [c.name.clone(), c.ty.to_string(), c.policy.keyword().to_string()]),
        )
        .collect();
    let name_width = rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0);
    let type_width = rows.iter().map(|r| r[1].chars().count()).max().unwrap_or(0);
    for [name, ty, policy] in rows {
        let _ = writeln!(out, "    {name:name_width$}  {ty:type_width$}  {policy}");
    }
}

fn render_problems(out: &mut String, word: &str, problems: &[&Problem]) {
    if problems.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n{}:", capitalised(&count(problems.len(), word)));
    for problem in problems {
        let _ = writeln!(out, "  {word}[{}]: {problem}", problem.code());
    }
}

fn count(n: usize, word: &str) -> String {
    match n {
        0 => format!("no {word}s"),
        1 => format!("1 {word}"),
        n => format!("{n} {word}s"),
    }
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
