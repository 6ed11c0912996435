//! Tolerant parsing of an LLM's list of questions.
//!
//! Accepts `{"questions": [...]}`, a bare JSON array of strings or of `{"question": ...}` objects,
//! the same inside a Markdown code fence, JSON cut off mid-way (the complete strings are kept), and
//! plain numbered or bulleted lists. Whatever is not a question (no `?`, under three words, or an
//! echo of instructions) is dropped; duplicates (case-insensitive) are removed.

/// The outcome of parsing one answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedQuestions {
    /// Questions kept, in answer order.
    pub questions: Vec<String>,
    /// Candidates dropped because they were not questions.
    pub dropped: usize,
    /// Whether the answer was valid JSON of an accepted shape.
    pub was_json: bool,
}

/// Parses an answer into questions.
pub fn parse_questions(answer: &str) -> ParsedQuestions {
    let body = strip_fences(answer);
    let (candidates, was_json) = match serde_json::from_str::<serde_json::Value>(body.trim()) {
        Ok(v) => match json_candidates(&v) {
            Some(c) => (c, true),
            None => (line_candidates(body), false),
        },
        Err(_) => {
            let salvaged = salvage_json_strings(body);
            if salvaged.is_empty() {
                (line_candidates(body), false)
            } else {
                (salvaged, false)
            }
        }
    };
    let mut out = ParsedQuestions {
        was_json,
        ..Default::default()
    };
    let mut seen = std::collections::HashSet::new();
    for c in candidates.iter().flat_map(|c| split_run_on(c)) {
        match clean_question(c) {
            Some(q) => {
                if seen.insert(q.to_lowercase()) {
                    out.questions.push(q);
                }
            }
            None => out.dropped += 1,
        }
    }
    out
}

fn strip_fences(s: &str) -> &str {
    let t = s.trim();
    if let Some(start) = t.find("```") {
        let after = &t[start + 3..];
        let after = after.find('\n').map_or(after, |nl| {
            let lang = &after[..nl];
            if lang.trim().chars().all(|c| c.is_ascii_alphanumeric()) {
                &after[nl + 1..]
            } else {
                after
            }
        });
        return after.find("```").map_or(after, |end| &after[..end]);
    }
    t
}

fn json_candidates(v: &serde_json::Value) -> Option<Vec<String>> {
    match v {
        serde_json::Value::Array(items) => Some(
            items
                .iter()
                .filter_map(|it| match it {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => ["question", "query", "q"]
                        .iter()
                        .find_map(|k| o.get(*k).and_then(|v| v.as_str()))
                        .map(str::to_string),
                    _ => None,
                })
                .collect(),
        ),
        serde_json::Value::Object(o) => {
            for key in ["questions", "queries", "items", "question"] {
                if let Some(inner) = o.get(key) {
                    if let Some(s) = inner.as_str() {
                        return Some(vec![s.to_string()]);
                    }
                    return json_candidates(inner);
                }
            }
            // A single other array-valued field is taken as the list.
            let arrays: Vec<_> = o.values().filter(|v| v.is_array()).collect();
            if arrays.len() == 1 {
                return json_candidates(arrays[0]);
            }
            None
        }
        _ => None,
    }
}

/// Complete JSON string literals of a cut-off answer (`{"questions": ["a?", "b?", "c` gives a, b).
fn salvage_json_strings(s: &str) -> Vec<String> {
    if !s.trim_start().starts_with(['{', '[']) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'"' {
            let mut j = i + 1;
            let mut escaped = false;
            while j < bytes.len() {
                match bytes[j] {
                    b'\\' if !escaped => escaped = true,
                    b'"' if !escaped => break,
                    _ => escaped = false,
                }
                j += 1;
            }
            if j >= bytes.len() {
                break;
            }
            if let Ok(lit) = serde_json::from_str::<String>(&s[i..=j]) {
                out.push(lit);
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

fn line_candidates(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Words that open a question, capitalised as at the start of a sentence.
const QUESTION_OPENERS: [&str; 16] = [
    "What", "How", "Why", "When", "Where", "Which", "Who", "Whose", "Can", "Could", "Does", "Do",
    "Is", "Are", "Should", "Will",
];

/// Splits a candidate that runs several questions together after each `?` that a list marker
/// (`"What is X? 2. Why Y?"`) or another question (`"What is X? How does Y work?"`) follows.
fn split_run_on(candidate: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in candidate.match_indices('?') {
        let rest = candidate[i + 1..].trim_start();
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        let numbered = digits > 0 && rest[digits..].starts_with(['.', ')']);
        let bulleted = rest.starts_with("- ") || rest.starts_with("* ") || rest.starts_with("• ");
        let first_word = rest
            .split(|c: char| !c.is_alphabetic())
            .next()
            .unwrap_or("");
        let question = QUESTION_OPENERS.contains(&first_word);
        if numbered || bulleted || question {
            out.push(&candidate[start..=i]);
            start = i + 1;
        }
    }
    out.push(&candidate[start..]);
    out
}

/// Cleans one candidate: strips numbering, bullets, labels and quotes; `None` if not a question.
pub fn clean_question(candidate: &str) -> Option<String> {
    let mut s = candidate.trim();
    // Bullets and numbering: "-", "*", "•", "1.", "1)", "(1)", "Q1:", "Question 2:".
    loop {
        let before = s;
        s = s
            .trim_start_matches(['-', '*', '•', '+', '#', '>'])
            .trim_start();
        let digits = s.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 && s[digits..].starts_with(['.', ')', ':']) {
            s = s[digits + 1..].trim_start();
        }
        if s.starts_with('(') {
            if let Some(end) = s.find(')') {
                if s[1..end].chars().all(|c| c.is_ascii_digit()) && end > 1 {
                    s = s[end + 1..].trim_start();
                }
            }
        }
        for label in ["question", "query", "q"] {
            if s.len() > label.len()
                && s.get(..label.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(label))
            {
                let rest = s[label.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
                if let Some(r) = rest.strip_prefix(':') {
                    s = r.trim_start();
                }
            }
        }
        s = s.trim_matches(|c| c == '"' || c == '\'' || c == '`' || c == '“' || c == '”');
        s = s.trim().trim_end_matches(',').trim_end_matches('"').trim();
        if s == before {
            break;
        }
    }
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if !s.ends_with('?') || s.split_whitespace().count() < 3 {
        return None;
    }
    let lower = s.to_lowercase();
    if lower.contains("json") || lower.starts_with("here are") || lower.contains("the passage") {
        return None;
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_object_array_and_fences() {
        let p = parse_questions(
            r#"{"questions": ["What is a heap file?", "How are indexes stored?"]}"#,
        );
        assert_eq!(
            p.questions,
            ["What is a heap file?", "How are indexes stored?"]
        );
        assert!(p.was_json);
        let p = parse_questions(
            "```json\n[\"Why use WAL at all?\", {\"question\": \"What does VACUUM do?\"}]\n```",
        );
        assert_eq!(p.questions, ["Why use WAL at all?", "What does VACUUM do?"]);
        assert!(p.was_json);
    }

    #[test]
    fn truncated_json_keeps_complete_strings() {
        let p = parse_questions(r#"{"questions": ["What is a heap file?", "How are ind"#);
        assert_eq!(p.questions, ["What is a heap file?"]);
        assert!(!p.was_json);
    }

    #[test]
    fn numbered_lists_and_non_questions() {
        let answer = "Here are 3 questions:\n1. What is MVCC?\n2) Q2: \"How does a checkpoint work?\"\n- This is a statement.\n* Why?\n(4) What does the planner estimate?\n1. What is MVCC?";
        let p = parse_questions(answer);
        assert_eq!(
            p.questions,
            [
                "What is MVCC?",
                "How does a checkpoint work?",
                "What does the planner estimate?"
            ]
        );
        assert_eq!(p.dropped, 3);
    }

    #[test]
    fn run_on_numbered_questions_are_split() {
        let p = parse_questions(
            r#"{"questions": ["How does VACUUM reclaim storage? 2. What is the purpose of VACUUM?", "Is 2.5 a version? Yes it is"]}"#,
        );
        assert_eq!(
            p.questions,
            [
                "How does VACUUM reclaim storage?",
                "What is the purpose of VACUUM?"
            ]
        );
        assert_eq!(p.dropped, 1, "the unsplit statement is not a question");
    }

    #[test]
    fn questions_run_together_on_one_line_are_split() {
        let p = parse_questions(
            "What is a Debian package? How does Debian differ from other distributions? Is it free? Yes. What is 2.5?",
        );
        assert_eq!(
            p.questions,
            [
                "What is a Debian package?",
                "How does Debian differ from other distributions?",
                "Is it free? Yes. What is 2.5?"
            ],
            "a short question stays with what follows it unless a question opener follows"
        );
    }

    #[test]
    fn garbage_gives_nothing() {
        assert!(parse_questions("").questions.is_empty());
        assert!(parse_questions("{\"questions\": []}").questions.is_empty());
        assert!(parse_questions("The passage says nothing useful.")
            .questions
            .is_empty());
        assert!(parse_questions("{\"foo\": 3}").questions.is_empty());
    }
}
