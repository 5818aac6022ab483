//! The page's HTML: plain server-rendered documents, no script, no external assets. Everything
//! that comes from the database or the request goes through [`esc`].

use std::fmt::Write;

use accord_engine::{Hlc, ReviewKind, Value};

use crate::node::review::{utc, ReviewEntry};

/// HTML-escapes text for element content and for quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:70rem;padding:0 1rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:2rem}
section.item{border:1px solid #ccc;border-radius:6px;padding:.6rem 1rem;margin:1rem 0}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #eee;vertical-align:top}
code,.value{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-all}
.meta{color:#555}.notice{padding:.6rem 1rem;border-radius:6px;margin:1rem 0}
.ok{background:#e7f6e7;border:1px solid #8c8}.error{background:#fbe9e9;border:1px solid #d88}
.provisional{font-size:.85em;color:#555}form.inline{display:inline}
button{cursor:pointer}
";

/// A whole document.
pub fn document(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n",
        esc(title)
    )
}

/// The page shown to a request without a valid session.
pub fn login(message: Option<&str>) -> String {
    let mut body = String::from("<h1>accord review</h1>");
    if let Some(message) = message {
        let _ = write!(body, "<p class=\"notice error\" id=\"error\">{}</p>", esc(message));
    }
    body.push_str(
        "<p>This page needs the reviewers' access token.</p>\
         <form method=\"post\" action=\"/login\" id=\"login\">\
         <label>Access token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required></label> \
         <button type=\"submit\">Log in</button></form>",
    );
    document("accord review: log in", &body)
}

/// A short page for a failure that leaves nothing to list (the database unreachable, a wrong path).
pub fn failure(message: &str) -> String {
    document(
        "accord review",
        &format!(
            "<h1>accord review</h1><p class=\"notice error\" id=\"error\">{}</p><p><a href=\"/\">Back to the queue</a></p>",
            esc(message)
        ),
    )
}

/// A message above the queue, after a resolution or a refused one.
pub enum Notice {
    Done(String),
    Error(String),
}

pub struct Queue<'a> {
    pub node: Option<i32>,
    pub csrf: &'a str,
    pub open: &'a [ReviewEntry],
    /// Closed items, newest first, each with when it closed (UTC text) when known.
    pub closed: &'a [(ReviewEntry, Option<String>)],
    /// How many closed items there are in all; only the newest are shown.
    pub closed_total: usize,
    pub notice: Option<Notice>,
}

pub fn queue(q: &Queue<'_>) -> String {
    let mut b = String::new();
    match q.node {
        Some(node) => {
            let _ = write!(b, "<h1>accord review <span class=\"meta\">node {node}</span></h1>");
        }
        None => b.push_str("<h1>accord review</h1>"),
    }
    let _ = write!(
        b,
        "<form method=\"post\" action=\"/logout\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\">Log out</button></form>",
        esc(q.csrf)
    );
    match &q.notice {
        Some(Notice::Done(m)) => {
            let _ = write!(b, "<p class=\"notice ok\" id=\"done\">{}</p>", esc(m));
        }
        Some(Notice::Error(m)) => {
            let _ = write!(b, "<p class=\"notice error\" id=\"error\">{}</p>", esc(m));
        }
        None => {}
    }

    let _ = write!(b, "<h2 id=\"open\">Open items ({})</h2>", q.open.len());
    if q.open.is_empty() {
        b.push_str("<p class=\"meta\">Nothing to review.</p>");
    }
    for e in q.open {
        open_item(&mut b, e, q.csrf);
    }

    let _ = write!(b, "<h2>Resolved history ({})</h2>", q.closed_total);
    b.push_str("<section id=\"history\">");
    if q.closed.is_empty() {
        b.push_str("<p class=\"meta\">No item has been closed yet.</p>");
    } else {
        if q.closed.len() < q.closed_total {
            let _ = write!(b, "<p class=\"meta\">The newest {} are shown.</p>", q.closed.len());
        }
        b.push_str(
            "<table><thead><tr><th>item</th><th>table</th><th>row key</th><th>column</th>\
             <th>status</th><th>closed by</th><th>value kept</th><th>closed at</th></tr></thead><tbody>",
        );
        for (e, closed_at) in q.closed {
            closed_item(&mut b, e, closed_at.as_deref());
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section>");
    document("accord review", &b)
}

fn value_html(v: &Value) -> String {
    match v {
        Value::Null => "<em>NULL</em>".to_owned(),
        v => format!("<span class=\"value\">{}</span>", esc(&v.to_string())),
    }
}

fn stamp_html(stamp: &Hlc) -> String {
    format!(
        "<time title=\"HLC {}\">{}</time>",
        esc(&stamp.to_string()),
        utc(stamp.physical)
    )
}

fn open_item(b: &mut String, e: &ReviewEntry, csrf: &str) {
    let id = esc(&e.id.to_string());
    let item = &e.item;
    let column = item.column.as_deref().unwrap_or("(whole change)");
    let kind = match item.kind {
        ReviewKind::Concurrent { .. } => "concurrent writes",
        ReviewKind::DisplacedInsert { .. } => "two inserts of one key",
        ReviewKind::Unapplicable { .. } => "change not applied",
    };
    let _ = write!(
        b,
        "<section class=\"item\" id=\"item-{id}\"><p><strong>{}</strong> row <code>{}</code> column <code>{}</code> \
         <span class=\"meta\">— {kind}, item <code>{id}</code></span></p>",
        esc(&item.table),
        esc(&item.key.to_string()),
        esc(column)
    );
    match &item.kind {
        ReviewKind::Concurrent {
            candidates,
            provisional,
        } => {
            let _ = write!(
                b,
                "<form method=\"post\" action=\"/items/{id}/resolve\" class=\"pick\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <table><thead><tr><th>#</th><th>value</th><th>origin node</th><th>written (UTC)</th><th></th></tr></thead><tbody>",
                esc(csrf)
            );
            for (i, c) in candidates.iter().enumerate() {
                let n = i + 1;
                let mark = if c.stamp == *provisional {
                    " <span class=\"provisional\">(provisional winner, held now)</span>"
                } else {
                    ""
                };
                let _ = write!(
                    b,
                    "<tr><td>{n}</td><td>{}{mark}</td><td>{}</td><td>{}</td>\
                     <td><button type=\"submit\" name=\"pick\" value=\"{n}\">Resolve with this value</button></td></tr>",
                    value_html(&c.value),
                    c.stamp.node,
                    stamp_html(&c.stamp)
                );
            }
            let _ = write!(
                b,
                "</tbody></table></form>\
                 <form method=\"post\" action=\"/items/{id}/resolve\" class=\"own\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <label>Or a value of your own <input type=\"text\" name=\"value\" size=\"30\"></label> \
                 <button type=\"submit\">Resolve with my value</button></form>",
                esc(csrf)
            );
        }
        ReviewKind::DisplacedInsert { created, values } => {
            let _ = write!(
                b,
                "<p>Node {} inserted this key at {} while another node's earlier insert of it was on its way; \
                 the earlier insert kept the row. The displaced insert, as the writes made on it left it:</p>\
                 <table><thead><tr><th>column</th><th>value</th></tr></thead><tbody>",
                created.node,
                stamp_html(created)
            );
            for (name, value) in values {
                let shown = match value {
                    Some(v) => value_html(v),
                    None => "<span class=\"meta\">(not known here)</span>".to_owned(),
                };
                let _ = write!(b, "<tr><td><code>{}</code></td><td>{shown}</td></tr>", esc(name));
            }
            let _ = write!(
                b,
                "</tbody></table>\
                 <form method=\"post\" action=\"/items/{id}/resolve\" class=\"pick\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button type=\"submit\" name=\"pick\" value=\"1\">Keep the row as it is</button> \
                 <button type=\"submit\" name=\"pick\" value=\"2\">Write the displaced insert's values over it</button>\
                 </form><p class=\"meta\">To keep both, insert the displaced one under a new key first, then keep the row.</p>",
                esc(csrf)
            );
        }
        ReviewKind::Unapplicable {
            origin,
            stamp,
            seq,
            error,
        } => {
            let _ = write!(
                b,
                "<p>Change {seq} from node {origin}, written {}, could not be applied here:</p>\
                 <p class=\"notice error\">{}</p>\
                 <p class=\"meta\">This is not a choice between values: fix the cause (for example the conflicting \
                 row), and the next change of the row carries the data again.</p>",
                stamp_html(stamp),
                esc(error)
            );
        }
    }
    b.push_str("</section>");
}

fn closed_item(b: &mut String, e: &ReviewEntry, closed_at: Option<&str>) {
    let id = esc(&e.id.to_string());
    let by = match (e.status.as_str(), e.closed_by.as_deref()) {
        ("resolved", Some(node)) => format!("a reviewer on node {}", esc(node)),
        ("resolved", None) => "a reviewer".to_owned(),
        ("superseded", _) => "a later write".to_owned(),
        (_, Some(node)) => format!("node {}", esc(node)),
        (_, None) => String::new(),
    };
    let value = match e.closed_value.as_deref() {
        Some(v) => format!("<span class=\"value\">{}</span>", esc(v)),
        None => String::new(),
    };
    let _ = write!(
        b,
        "<tr id=\"closed-{id}\"><td><code>{id}</code></td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td>\
         <td class=\"status\">{}</td><td>{by}</td><td>{value}</td><td>{}</td></tr>",
        esc(&e.item.table),
        esc(&e.item.key.to_string()),
        esc(e.item.column.as_deref().unwrap_or("")),
        esc(&e.status),
        esc(closed_at.unwrap_or(""))
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use accord_engine::ReviewItem;

    #[test]
    fn markup_in_values_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert!(!login(Some("<b>")).contains("<b>"));
    }

    #[test]
    fn a_displaced_insert_shows_its_values_and_both_choices() {
        let created = Hlc::new(1_700_000_000_000_000, 0, accord_engine::NodeId(2));
        let item = ReviewItem::displaced_insert_of(
            "shop.bookings",
            &accord_engine::RowKey(vec![Value::Int(7)]),
            created,
            vec![
                ("guest".into(), Some(Value::text("<Ann>"))),
                ("nights".into(), Some(Value::Int(3))),
                ("note".into(), None),
            ],
        );
        let entry = ReviewEntry {
            id: item.id,
            status: "open".into(),
            item,
            closed_value: None,
            closed_by: None,
        };
        let mut page = String::new();
        open_item(&mut page, &entry, "token");
        assert!(page.contains("two inserts of one key"), "{page}");
        assert!(page.contains("&lt;Ann&gt;") && !page.contains("<Ann>"), "{page}");
        assert!(page.contains("(not known here)"), "{page}");
        assert!(
            page.contains("name=\"pick\" value=\"1\">Keep the row as it is"),
            "{page}"
        );
        assert!(
            page.contains("name=\"pick\" value=\"2\">Write the displaced insert"),
            "{page}"
        );
        assert!(page.contains("Node 2 inserted this key"), "{page}");
    }
}
