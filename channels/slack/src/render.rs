//! A reply (markdown) as Slack `mrkdwn` text, split into messages Slack shows whole.

use patchbay_channel_core::Reply;

/// The longest `text` patchbay posts in one message. Slack's docs ask to keep `text` within
/// 4,000 characters (it truncates past 40,000); parts are cut on paragraph, line or word
/// boundaries where one lies in the last quarter.
pub const MAX_TEXT_CHARS: usize = 4000;

/// Markdown → mrkdwn: `&`, `<`, `>` escaped (Slack's control characters), `**bold**` →
/// `*bold*`, `~~strike~~` → `~strike~`, `[text](url)` → `<url|text>`, `# Heading` → `*Heading*`.
/// Code (fenced or inline) is kept as it is, escaped only.
pub fn mrkdwn(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len() + 16);
    let mut in_fence = false;
    for (i, line) in markdown.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let escaped = escape(line);
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            out.push_str(&escaped);
            continue;
        }
        if in_fence {
            out.push_str(&escaped);
            continue;
        }
        let trimmed = escaped.trim_start();
        let heading = trimmed.starts_with('#') && {
            let hashes = trimmed.chars().take_while(|c| *c == '#').count();
            hashes <= 6 && trimmed[hashes..].starts_with(' ')
        };
        if heading {
            let text = trimmed.trim_start_matches('#').trim();
            out.push('*');
            out.push_str(&inline(&text.replace("**", "")));
            out.push('*');
        } else {
            out.push_str(&inline(&escaped));
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Inline transforms outside `code` spans.
fn inline(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for (i, part) in line.split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        if i % 2 == 1 {
            out.push_str(part);
        } else {
            out.push_str(&links(&part.replace("**", "*").replace("~~", "~")));
        }
    }
    out
}

/// `[text](url)` → `<url|text>` for http(s) and mailto URLs.
fn links(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let parsed = after.find("](").and_then(|close| {
            let text = &after[..close];
            let tail = &after[close + 2..];
            let end = tail.find(')')?;
            let url = &tail[..end];
            let ok = (url.starts_with("http://") || url.starts_with("https://") || url.starts_with("mailto:")) && !url.contains(' ') && !text.contains('[');
            ok.then(|| (text, url, open + 1 + close + 2 + end + 1))
        });
        match parsed {
            Some((text, url, consumed)) => {
                out.push_str(&rest[..open]);
                if text.is_empty() {
                    out.push_str(&format!("<{url}>"));
                } else {
                    out.push_str(&format!("<{url}|{}>", text.replace('|', "¦")));
                }
                rest = &rest[consumed..];
            }
            None => {
                out.push_str(&rest[..open + 1]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The whole reply as mrkdwn: the text, then attachments as links, then the quick replies
/// as a line of options (Slack buttons need an interactivity endpoint patchbay does not have).
pub fn render(reply: &Reply) -> String {
    let mut out = mrkdwn(&reply.text);
    for a in &reply.attachments {
        let name = a.name.clone().unwrap_or_else(|| a.url.clone());
        out.push_str(if out.is_empty() { "" } else { "\n" });
        out.push_str(&format!("<{}|{}>", a.url, escape(&name).replace('|', "¦")));
    }
    if !reply.quick_replies.is_empty() {
        let options: Vec<String> = reply.quick_replies.iter().map(|q| escape(&q.title)).collect();
        out.push_str(&format!("\n\n{}", options.join(" · ")));
    }
    out
}

/// Splits `text` into parts of at most `max` characters, preferring a paragraph break, then
/// a line break, then a space in the last quarter of a part. Never splits inside a
/// character or an escape (`&amp;`). Empty text is one empty part.
pub fn split(text: &str, max: usize) -> Vec<String> {
    assert!(max >= 16);
    let mut parts = Vec::new();
    let mut rest = text;
    while rest.chars().count() > max {
        let hard = rest.char_indices().nth(max).map(|(i, _)| i).unwrap_or(rest.len());
        let window = &rest[..hard];
        let floor = rest.char_indices().nth(max * 3 / 4).map(|(i, _)| i).unwrap_or(0);
        let cut = [window.rfind("\n\n"), window.rfind('\n'), window.rfind(' ')]
            .into_iter()
            .flatten()
            .find(|&i| i >= floor && i > 0)
            .unwrap_or_else(|| {
                // No boundary: cut hard, but not inside an HTML escape.
                match window[window.len().saturating_sub(6)..].rfind('&') {
                    Some(j) if !window[window.len() - 6 + j..].contains(';') => window.len() - 6 + j,
                    _ => hard,
                }
            });
        parts.push(rest[..cut].trim_end().to_owned());
        rest = rest[cut..].trim_start_matches(['\n', ' ']);
    }
    parts.push(rest.to_owned());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_becomes_mrkdwn() {
        assert_eq!(mrkdwn("**bold** and ~~gone~~"), "*bold* and ~gone~");
        assert_eq!(mrkdwn("see [the guide](https://x.example/a?b=1&c=2)"), "see <https://x.example/a?b=1&amp;c=2|the guide>");
        assert_eq!(mrkdwn("# Title\ntext"), "*Title*\ntext");
        assert_eq!(mrkdwn("a < b & c > d"), "a &lt; b &amp; c &gt; d");
        assert_eq!(mrkdwn("`**not bold**` **bold**"), "`**not bold**` *bold*");
        assert_eq!(mrkdwn("```\n**x** [a](https://b)\n```"), "```\n**x** [a](https://b)\n```");
        assert_eq!(mrkdwn("[not a link](javascript:x)"), "[not a link](javascript:x)");
    }

    #[test]
    fn long_text_splits_on_boundaries_within_the_limit() {
        let para = "word ".repeat(300); // 1500 chars
        let text = format!("{para}\n\n{para}\n\n{para}");
        let parts = split(&text, MAX_TEXT_CHARS);
        assert!(parts.len() >= 2);
        assert!(parts.iter().all(|p| p.chars().count() <= MAX_TEXT_CHARS));
        assert_eq!(parts.join(" ").split_whitespace().count(), text.split_whitespace().count(), "no word lost");
        assert!(parts[0].ends_with("word") && !parts[1].starts_with(char::is_whitespace), "cut at a boundary: {:?}", &parts[0][parts[0].len() - 10..]);
        assert_eq!(split("short", 100), vec!["short"]);
        assert_eq!(split("", 100), vec![""]);
    }

    #[test]
    fn text_without_spaces_is_cut_on_character_boundaries() {
        let text = "é".repeat(9000);
        let parts = split(&text, MAX_TEXT_CHARS);
        assert_eq!(parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(), vec![4000, 4000, 1000]);
        let escaped = format!("{}&amp;rest", "x".repeat(36));
        let parts = split(&escaped, 40);
        assert!(parts[0].ends_with('x') && parts[1].starts_with("&amp;"), "{parts:?}");
    }
}
