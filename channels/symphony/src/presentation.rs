//! PresentationML (what the datafeed carries) to the plain text an assistant sees.
//!
//! Like the BDKs' `getTextContent`: the text of every node, entities decoded, trimmed — plus
//! line breaks for `<br/>` and block ends, and the bot's own mention removed (with a `,` or
//! `:` right after it), because the assistant is being talked to, not about. Mentions are
//! recognised through the message's EntityJSON (`data`): a `<span class="entity"
//! data-entity-id="m1">` whose entity is a `com.symphony.user.mention` of the bot's user id.
//!
//! A small hand-written scanner, not an XML library: it never resolves DTDs or external
//! entities (there is nothing to resolve), and a malformed message still yields its text.

use std::collections::HashSet;

/// What a message says, for the assistant.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    pub text: String,
    /// The bot was @mentioned.
    pub mentions_bot: bool,
    /// User ids of every mention (the bot's too).
    pub mentions: Vec<String>,
}

/// The user ids an EntityJSON entity mentions, if it is a mention.
fn mention_ids(entity: &serde_json::Value) -> Option<Vec<String>> {
    if entity.get("type").and_then(|t| t.as_str()) != Some("com.symphony.user.mention") {
        return None;
    }
    let ids = entity.get("id")?.as_array()?;
    Some(
        ids.iter()
            .filter_map(|i| match i.get("value") {
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
    )
}

/// Decodes XML/HTML character references in `s` (`&amp;`, `&#38;`, `&#x26;`, `&nbsp;` …);
/// an unknown one is kept as written.
pub fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest[1..].find(|c: char| c == ';' || c == '&' || c.is_whitespace()).map(|e| e + 1);
        let decoded = end.filter(|e| rest.as_bytes().get(*e) == Some(&b';')).and_then(|e| {
            let name = &rest[1..e];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                n if n.starts_with("#x") || n.starts_with("#X") => u32::from_str_radix(&n[2..], 16).ok().and_then(char::from_u32),
                n if n.starts_with('#') => n[1..].parse::<u32>().ok().and_then(char::from_u32),
                _ => None,
            }?;
            Some((c, e + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The value of attribute `name` in a start tag's inside (`span class="entity" …`).
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = tag;
    while let Some(i) = rest.find(name) {
        let before_ok = i == 0 || rest.as_bytes()[i - 1].is_ascii_whitespace();
        let after = rest[i + name.len()..].trim_start();
        if before_ok {
            if let Some(v) = after.strip_prefix('=') {
                let v = v.trim_start();
                let q = v.chars().next()?;
                if q == '"' || q == '\'' {
                    let body = &v[1..];
                    return body.find(q).map(|e| &body[..e]);
                }
            }
        }
        rest = &rest[i + name.len()..];
    }
    None
}

const BLOCKS: &[&str] = &["p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "ul", "ol", "table", "card"];

/// Turns a PresentationML message into text. `data` is the message's EntityJSON (a JSON
/// string, possibly empty); `bot_id` the bot's user id.
pub fn to_text(presentation_ml: &str, data: &str, bot_id: &str) -> Parsed {
    let entities: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
    let mut mentions = Vec::new();
    let mut bot_entities = HashSet::new();
    if let Some(map) = entities.as_object() {
        for (key, entity) in map {
            if let Some(ids) = mention_ids(entity) {
                if ids.iter().any(|i| i == bot_id) {
                    bot_entities.insert(key.clone());
                }
                mentions.extend(ids);
            }
        }
    }

    let mut out = String::new();
    // Depth of open elements inside the bot's mention span (0: not inside one).
    let mut skipping = 0usize;
    let mut mentions_bot = false;
    let mut after_mention = false;
    let mut rest = presentation_ml;
    let mut depth = 0usize;
    while !rest.is_empty() {
        if let Some(tail) = rest.strip_prefix("<!--") {
            rest = tail.find("-->").map(|e| &tail[e + 3..]).unwrap_or("");
            continue;
        }
        if let Some(tail) = rest.strip_prefix("<![CDATA[") {
            let (text, next) = tail.find("]]>").map(|e| (&tail[..e], &tail[e + 3..])).unwrap_or((tail, ""));
            if skipping == 0 {
                push_text(&mut out, text, &mut after_mention);
            }
            rest = next;
            continue;
        }
        if rest.starts_with('<') {
            let Some(end) = rest.find('>') else { break };
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('!') || tag.starts_with('?') {
                continue; // DOCTYPE, processing instructions: ignored, never resolved
            }
            let closing = tag.starts_with('/');
            let self_closing = tag.ends_with('/');
            let name: String = tag
                .trim_start_matches('/')
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '/')
                .collect::<String>()
                .to_ascii_lowercase();
            if skipping > 0 {
                if closing {
                    skipping -= 1;
                    if skipping == 0 {
                        after_mention = true;
                    }
                } else if !self_closing {
                    skipping += 1;
                }
                continue;
            }
            if closing {
                depth = depth.saturating_sub(1);
                // The root <div data-format="PresentationML"> closing adds nothing.
                if BLOCKS.contains(&name.as_str()) && depth > 0 {
                    newline(&mut out);
                }
                continue;
            }
            if name == "br" || name == "hr" {
                out.push('\n');
                continue;
            }
            if !self_closing {
                depth += 1;
            }
            if BLOCKS.contains(&name.as_str()) && depth > 1 {
                newline(&mut out);
            }
            let is_bot_mention = name == "span"
                && attr(tag, "class").is_some_and(|c| c.split_whitespace().any(|c| c == "entity"))
                && attr(tag, "data-entity-id").is_some_and(|id| bot_entities.contains(id));
            if is_bot_mention && !self_closing {
                mentions_bot = true;
                skipping = 1;
                depth -= 1;
            }
            continue;
        }
        let end = rest.find('<').unwrap_or(rest.len());
        if skipping == 0 {
            push_text(&mut out, &unescape(&rest[..end]), &mut after_mention);
        }
        rest = &rest[end..];
    }
    let text = out
        .lines()
        .map(|l| l.trim_end())
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .replace('\u{a0}', " ");
    mentions.sort();
    mentions.dedup();
    Parsed { text, mentions_bot, mentions }
}

/// Appends text; right after the bot's removed mention, drops one `,` or `:` and the spaces
/// around it so `@bot, reset my password` reads `reset my password`.
fn push_text(out: &mut String, text: &str, after_mention: &mut bool) {
    let mut t = text;
    if *after_mention {
        *after_mention = false;
        let trimmed = t.trim_start();
        let trimmed = trimmed.strip_prefix([',', ':']).unwrap_or(trimmed);
        t = trimmed.trim_start();
        if !t.is_empty() && !out.is_empty() && !out.ends_with([' ', '\n']) {
            out.push(' ');
        }
        if out.ends_with(' ') && t.is_empty() {
            return;
        }
    }
    out.push_str(t);
}

fn newline(out: &mut String) {
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOT: &str = "349026222342678";

    fn data(entities: &[(&str, &str)]) -> String {
        let mut m = serde_json::Map::new();
        for (key, uid) in entities {
            m.insert(
                key.to_string(),
                serde_json::json!({"type": "com.symphony.user.mention", "version": "1.0",
                                   "id": [{"type": "com.symphony.user.userId", "value": uid.parse::<i64>().unwrap()}]}),
            );
        }
        serde_json::Value::Object(m).to_string()
    }

    #[test]
    fn plain_text_is_unescaped_and_trimmed() {
        let p = to_text(r#"<div data-format="PresentationML" data-version="2.0"> a &lt; b &amp;&amp; c &#36;{x} &#x23;{y} &quot;q&quot; </div>"#, "", BOT);
        assert_eq!(p.text, r#"a < b && c ${x} #{y} "q""#);
        assert!(!p.mentions_bot);
    }

    #[test]
    fn the_bots_mention_is_removed_and_others_kept() {
        let ml = r#"<div data-format="PresentationML" data-version="2.0"><span class="entity" data-entity-id="0">@Patchbay Bot</span>, ask <span class="entity" data-entity-id="1">@Alice Smith</span> about it</div>"#;
        let p = to_text(ml, &data(&[("0", BOT), ("1", "7078106482890")]), BOT);
        assert_eq!(p.text, "ask @Alice Smith about it");
        assert!(p.mentions_bot);
        assert_eq!(p.mentions, vec![BOT.to_owned(), "7078106482890".to_owned()]);

        // In the middle of a sentence, and with the id given as a string.
        let ml = r#"<div data-format="PresentationML" data-version="2.0">hello <span class="entity" data-entity-id="m">@Bot</span> how are you</div>"#;
        let d = format!(r#"{{"m":{{"type":"com.symphony.user.mention","id":[{{"type":"com.symphony.user.userId","value":"{BOT}"}}]}}}}"#);
        let p = to_text(ml, &d, BOT);
        assert_eq!(p.text, "hello how are you");
        assert!(p.mentions_bot);
    }

    #[test]
    fn a_mention_of_someone_else_does_not_address_the_bot() {
        let ml = r#"<div data-format="PresentationML" data-version="2.0"><span class="entity" data-entity-id="0">@Alice</span> hi</div>"#;
        let p = to_text(ml, &data(&[("0", "12")]), BOT);
        assert_eq!(p.text, "@Alice hi");
        assert!(!p.mentions_bot);
    }

    #[test]
    fn breaks_and_blocks_become_lines_and_hashtags_stay() {
        let ml = r#"<div data-format="PresentationML" data-version="2.0"><p>first</p><p>second<br/>third <span class="entity" data-entity-id="h">#markets</span></p><ul><li>a</li><li>b</li></ul></div>"#;
        let d = r#"{"h":{"type":"org.symphonyoss.taxonomy","id":[{"type":"org.symphonyoss.taxonomy.hashtag","value":"markets"}]}}"#;
        assert_eq!(to_text(ml, d, BOT).text, "first\nsecond\nthird #markets\na\nb");
    }

    #[test]
    fn doctype_and_entities_are_never_resolved() {
        let ml = r#"<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><div>&e; ok</div>"#;
        let t = to_text(ml, "not json", BOT).text;
        assert!(t.ends_with("&e; ok") && !t.contains("root:"), "{t}");
    }
}
