//! Replies as MessageML: text escaped per the BDK's table (`MessageUtil.escapeSpecialChars`:
//! XML's five plus every character Freemarker or the markdown layer could read as syntax),
//! line breaks as `<br/>`, split into messages that stay within the pod's limits.
//!
//! Limits (MessageML v2 docs): 81,130 characters of the encrypted markdown representation
//! and 2,500 unique tokens per message. Encryption and base64 grow the text by about a third,
//! so one message carries at most [`MAX_PART_CHARS`] characters of text and
//! [`MAX_PART_TOKENS`] distinct words — comfortably inside both.

use patchbay_channel_core::Reply;
use std::collections::HashSet;

pub const MAX_PART_CHARS: usize = 40_000;
pub const MAX_PART_TOKENS: usize = 2_000;

/// Escapes text for MessageML (single pass, so `&` is never escaped twice).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '#' => out.push_str("&#35;"),
            '$' => out.push_str("&#36;"),
            '%' => out.push_str("&#37;"),
            '(' => out.push_str("&#40;"),
            ')' => out.push_str("&#41;"),
            '*' => out.push_str("&#42;"),
            '.' => out.push_str("&#46;"),
            ';' => out.push_str("&#59;"),
            '=' => out.push_str("&#61;"),
            '[' => out.push_str("&#91;"),
            '\\' => out.push_str("&#92;"),
            ']' => out.push_str("&#93;"),
            '`' => out.push_str("&#96;"),
            '{' => out.push_str("&#123;"),
            '}' => out.push_str("&#125;"),
            c => out.push(c),
        }
    }
    out
}

/// Escaped text with line breaks as `<br/>` (MessageML collapses raw newlines).
fn escape_lines(text: &str) -> String {
    text.replace("\r\n", "\n").split('\n').map(escape).collect::<Vec<_>>().join("<br/>")
}

/// The text a reply shows: its text, then its attachments' links and its quick replies as a
/// list (Symphony bots have no buttons without Elements forms).
pub fn plain(reply: &Reply) -> String {
    let mut text = reply.text.clone();
    for a in &reply.attachments {
        let name = a.name.clone().unwrap_or_else(|| a.url.clone());
        text.push_str(&format!("\n{name}: {}", a.url));
    }
    if !reply.quick_replies.is_empty() {
        text.push('\n');
        for q in &reply.quick_replies {
            text.push_str(&format!("\n• {}", q.title));
        }
    }
    text.trim_end().to_owned()
}

/// The messages a reply is sent as, in order, each a complete `<messageML>` document.
pub fn render(reply: &Reply) -> Vec<String> {
    split(&plain(reply), MAX_PART_CHARS, MAX_PART_TOKENS)
        .into_iter()
        .map(|part| format!("<messageML>{}</messageML>", escape_lines(&part)))
        .collect()
}

/// Splits text into parts of at most `max_chars` characters and `max_tokens` distinct
/// whitespace-separated words, preferring to cut after a line break, else after a space.
/// Concatenating the parts gives the text back.
pub fn split(text: &str, max_chars: usize, max_tokens: usize) -> Vec<String> {
    // Most replies fit in one part: at most `max_chars` bytes (so characters) and at most
    // `max_tokens` words (so distinct words).
    if text.len() <= max_chars && text.split_whitespace().nth(max_tokens).is_none() {
        return vec![text.to_owned()];
    }
    let mut parts = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut start = 0;
    while start < chars.len() {
        // The hard end: the character budget, or the word that would be one token too many.
        let mut end = (start + max_chars).min(chars.len());
        let mut tokens: HashSet<String> = HashSet::new();
        let mut word = String::new();
        for (i, &c) in chars[start..end].iter().enumerate() {
            if c.is_whitespace() {
                if !word.is_empty() {
                    tokens.insert(std::mem::take(&mut word));
                }
            } else {
                if word.is_empty() && tokens.len() >= max_tokens {
                    end = start + i;
                    break;
                }
                word.push(c);
            }
        }
        if end < chars.len() {
            // Prefer a line break, else a space, in the last quarter of the part.
            let window = &chars[start..end];
            let floor = window.len() * 3 / 4;
            let cut = window.iter().rposition(|&c| c == '\n').filter(|&p| p >= floor)
                .or_else(|| window.iter().rposition(|&c| c.is_whitespace()).filter(|&p| p >= floor));
            if let Some(p) = cut {
                end = start + p + 1;
            }
        }
        if end == start {
            end = start + 1; // a single word longer than a part: cut it
        }
        parts.push(chars[start..end].iter().collect());
        start = end;
    }
    parts
}

/// Stream ids go into URL paths URL-safe and unpadded (`+`→`-`, `/`→`_`, no `=`), as the
/// Java BDK's `IdUtil.toUrlSafeIdIfNeeded` does.
pub fn url_safe_stream_id(id: &str) -> String {
    id.trim().replace('+', "-").replace('/', "_").trim_end_matches('=').to_owned()
}

/// A `multipart/form-data` body with text fields, and its boundary.
pub fn multipart(fields: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = format!("patchbay-{:032x}", rand::random::<u128>());
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(value.as_bytes());
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (boundary, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_per_the_bdk_table() {
        assert_eq!(escape("a < b & c > d"), "a &lt; b &amp; c &gt; d");
        assert_eq!(escape("${x} #{y}"), "&#36;&#123;x&#125; &#35;&#123;y&#125;");
        assert_eq!(escape(r#"'"%()*.;=[\]`"#), "&apos;&quot;&#37;&#40;&#41;&#42;&#46;&#59;&#61;&#91;&#92;&#93;&#96;");
        assert_eq!(escape("héllo 👋"), "héllo 👋");
        assert_eq!(escape("&amp;"), "&amp;amp&#59;");
    }

    #[test]
    fn renders_lines_links_and_choices() {
        let mut r = Reply::text("line 1\nline <2>");
        r.quick_replies.push(patchbay_channel_core::QuickReply { title: "Yes".into(), payload: "y".into() });
        let parts = render(&r);
        assert_eq!(parts, vec!["<messageML>line 1<br/>line &lt;2&gt;<br/><br/>• Yes</messageML>"]);
    }

    #[test]
    fn splits_within_limits_at_line_breaks_and_keeps_everything() {
        let text = (0..100).map(|i| format!("line {i:03} of the answer")).collect::<Vec<_>>().join("\n");
        let parts = split(&text, 200, 1000);
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|p| p.chars().count() <= 200));
        assert!(parts[..parts.len() - 1].iter().all(|p| p.ends_with('\n')), "{parts:?}");
        assert_eq!(parts.concat(), text);

        // Distinct words: 10 per part at most.
        let words = (0..35).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let parts = split(&words, 10_000, 10);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.concat(), words);
        for p in &parts {
            let distinct: HashSet<&str> = p.split_whitespace().collect();
            assert!(distinct.len() <= 10, "{p}");
        }

        // Within both limits: one part, the text as it is (up to the limits exactly).
        assert_eq!(split("echo: question 1 & more", 40_000, 2_000), ["echo: question 1 & more"]);
        assert_eq!(split("a b c", 5, 3), ["a b c"]);
        assert_eq!(split("a b c d", 100, 3).len(), 2);
        assert_eq!(split("", 10, 10), [""]);

        // No whitespace at all: cut at the budget, on character boundaries.
        let long = "é".repeat(25);
        let parts = split(&long, 10, 10);
        assert_eq!(parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(), [10, 10, 5]);
    }

    #[test]
    fn stream_ids_are_url_safe_without_padding() {
        assert_eq!(url_safe_stream_id("XlU3OH9eVMzq+yss7M/xyn///oxwgbtGbQ=="), "XlU3OH9eVMzq-yss7M_xyn___oxwgbtGbQ");
        assert_eq!(url_safe_stream_id("YuK1c2y2yuie6-UfQnjSPX___pQEn69idA"), "YuK1c2y2yuie6-UfQnjSPX___pQEn69idA");
    }

    #[test]
    fn multipart_has_the_fields() {
        let (b, body) = multipart(&[("message", "<messageML>hi</messageML>")]);
        let s = String::from_utf8(body).unwrap();
        assert!(s.starts_with(&format!("--{b}\r\nContent-Disposition: form-data; name=\"message\"")));
        assert!(s.contains("\r\n\r\n<messageML>hi</messageML>\r\n"));
        assert!(s.ends_with(&format!("--{b}--\r\n")));
    }
}
