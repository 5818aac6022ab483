//! The report for machines: one JSON object.

use accord_schema_annotations::{Checked, Problem};
use serde::Serialize;

#[derive(Serialize)]
struct Report<'a> {
    /// No errors (warnings allowed); the same as exit status 0.
    ok: bool,
    tables: Vec<Table<'a>>,
    errors: Vec<Finding<'a>>,
    warnings: Vec<Finding<'a>>,
    /// Only when there is no error: with errors, the policy lacks the tables that have them.
    fingerprint: Option<String>,
}

#[derive(Serialize)]
struct Table<'a> {
    name: &'a str,
    /// What two concurrent inserts of one key mean: `merge` or `review`.
    inserts: &'static str,
    key: Vec<Column<'a>>,
    columns: Vec<Column<'a>>,
}

#[derive(Serialize)]
struct Column<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    ty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'static str>,
}

#[derive(Serialize)]
struct Finding<'a> {
    code: &'static str,
    table: &'a str,
    column: Option<&'a str>,
    message: String,
}

pub fn render(checked: &Checked) -> serde_json::Result<String> {
    let ok = !checked.has_errors();
    let report = Report {
        ok,
        tables: checked
            .policy
            .tables()
            .iter()
            .map(|t| Table {
                name: &t.name,
                inserts: t.inserts.keyword(),
                key: t
                    .key
                    .iter()
                    .map(|k| Column {
                        name: &k.name,
                        ty: k.ty.to_string(),
                        policy: None,
                    })
                    .collect(),
                columns: t
                    .columns
                    .iter()
                    .map(|c| Column {
                        name: &c.name,
                        ty: c.ty.to_string(),
                        policy: Some(c.policy.keyword()),
                    })
                    .collect(),
            })
            .collect(),
        errors: checked.errors().map(finding).collect(),
        warnings: checked.warnings().map(finding).collect(),
        fingerprint: ok.then(|| checked.policy.fingerprint().to_hex()),
    };
    let mut text = serde_json::to_string_pretty(&report)?;
    text.push('\n');
    Ok(text)
}

fn finding(problem: &Problem) -> Finding<'_> {
    Finding {
        code: problem.code(),
        table: problem.table(),
        column: problem.column(),
        message: problem.to_string(),
    }
}
