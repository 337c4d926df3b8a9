//! Splitting long text into posts Mattermost accepts.

/// Splits `text` into parts of at most `max` runes (Unicode scalar values, as Go counts
/// runes), on rune boundaries. Empty text is one empty part.
pub fn split_runes(text: &str, max: usize) -> Vec<&str> {
    assert!(max > 0);
    let mut parts = Vec::new();
    let mut start = 0;
    let mut count = 0;
    for (i, _) in text.char_indices() {
        if count == max {
            parts.push(&text[start..i]);
            start = i;
            count = 0;
        }
        count += 1;
    }
    parts.push(&text[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split_runes("hello", 10), vec!["hello"]);
        assert_eq!(split_runes("", 10), vec![""]);
    }

    #[test]
    fn splits_on_rune_boundaries() {
        let text = "é".repeat(25);
        let parts = split_runes(&text, 10);
        assert_eq!(parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(), vec![10, 10, 5]);
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn exact_multiple_has_no_empty_tail() {
        let text = "ab".repeat(10);
        assert_eq!(split_runes(&text, 10).len(), 2);
    }

    #[test]
    fn emoji_count_as_one_rune() {
        let text = "😀".repeat(16384);
        let parts = split_runes(&text, crate::MAX_POST_RUNES);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].chars().count(), 16383);
        assert_eq!(parts[1], "😀");
    }
}
