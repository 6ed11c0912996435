//! A user's own questions (`--eval-queries PATH`): a BEIR directory (its own corpus and
//! judgements), or a JSONL file of `{"query": "...", "relevant": ["chunk id or passage", ...]}`
//! judged against the corpus being evaluated (a job's chunks, or `--test-data`'s corpus).
//!
//! A `relevant` entry names a corpus document by id, or quotes a passage: it then marks every
//! document whose text contains the passage, or whose whole text the passage contains (compared
//! case-folded, whitespace collapsed), so a passage copied from the source finds its chunks
//! whatever the chunking. Entries that find nothing are reported, never silently dropped.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::beir::{self, BeirDataset, BeirError};

/// Errors raised while reading a question file.
#[derive(Debug, thiserror::Error)]
pub enum QuestionsError {
    /// The file cannot be read.
    #[error("{path}: cannot read the questions ({source}); pass a BEIR directory or a JSONL file of {{\"query\", \"relevant\"}} lines")]
    Io {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A BEIR directory is malformed.
    #[error(transparent)]
    Beir(#[from] BeirError),
    /// A JSONL line is malformed.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No question in the file.
    #[error("{path}: no questions with relevant documents")]
    Empty {
        /// The path given.
        path: PathBuf,
    },
    /// No question has a relevant entry that matches a document.
    #[error("{path}: no question matched a document of the corpus: give chunk ids from the test set's corpus.jsonl, or passages copied from the documents")]
    NoMatch {
        /// The path given.
        path: PathBuf,
        /// The entries that matched nothing (`question N: "..."`).
        unmatched: Vec<String>,
    },
    /// A JSONL file needs a corpus to be judged against.
    #[error("{path} is a JSONL question file: its relevant entries refer to a corpus, so give the test set (--test-data) whose corpus.jsonl they name")]
    NoCorpus {
        /// The path given.
        path: PathBuf,
    },
}

/// One line of a JSONL question file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    /// The question as the user would ask it.
    pub query: String,
    /// Relevant corpus document ids or passages.
    pub relevant: Vec<String>,
}

/// A question file as read, before it is judged against a corpus.
#[derive(Debug, Clone)]
pub enum QuestionFile {
    /// A complete BEIR test set.
    Beir(BeirDataset),
    /// Questions whose relevant entries refer to the evaluated corpus.
    Jsonl(Vec<Question>),
}

/// Questions ready to evaluate, and the entries that matched nothing.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The test set (queries without any match are left out).
    pub data: BeirDataset,
    /// `line N: "entry"` for every relevant entry that matched no corpus document.
    pub unmatched: Vec<String>,
}

/// Reads `path`: a directory is a BEIR test set (loaded without titles), a file is JSONL.
pub fn read(path: &Path) -> Result<QuestionFile, QuestionsError> {
    if path.is_dir() {
        let data = beir::load(path, false)?;
        if !data.qrels.values().any(|r| !r.is_empty()) {
            return Err(QuestionsError::Empty { path: path.into() });
        }
        return Ok(QuestionFile::Beir(data));
    }
    let text = std::fs::read_to_string(path).map_err(|source| QuestionsError::Io {
        path: path.into(),
        source,
    })?;
    let mut questions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| QuestionsError::Line {
            path: path.into(),
            line: i + 1,
            message,
        };
        let q: Question = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "expected {{\"query\": \"...\", \"relevant\": [\"chunk id or passage\", ...]}}: {e}"
            ))
        })?;
        if q.query.trim().is_empty() {
            return Err(bad("the query is empty".into()));
        }
        if q.relevant.iter().all(|r| r.trim().is_empty()) {
            return Err(bad("no relevant chunk id or passage".into()));
        }
        questions.push(q);
    }
    if questions.is_empty() {
        return Err(QuestionsError::Empty { path: path.into() });
    }
    Ok(QuestionFile::Jsonl(questions))
}

/// Reads `path` ([`read`]) and judges it against `corpus` ([`resolve`]); a JSONL file needs a
/// corpus, and a file none of whose questions match is refused.
pub fn load(path: &Path, corpus: Option<&[(String, String)]>) -> Result<Resolved, QuestionsError> {
    let file = read(path)?;
    let corpus = match (&file, corpus) {
        (QuestionFile::Jsonl(_), None) => {
            return Err(QuestionsError::NoCorpus { path: path.into() })
        }
        (_, corpus) => corpus.unwrap_or_default(),
    };
    let resolved = resolve(file, corpus);
    if resolved.data.queries.is_empty() {
        return Err(QuestionsError::NoMatch {
            path: path.into(),
            unmatched: resolved.unmatched,
        });
    }
    Ok(resolved)
}

fn fold(s: &str) -> String {
    s.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Judges the questions against `corpus` ((id, text) pairs); a BEIR file keeps its own corpus
/// and judgements.
pub fn resolve(file: QuestionFile, corpus: &[(String, String)]) -> Resolved {
    let questions = match file {
        QuestionFile::Beir(data) => {
            return Resolved {
                data,
                unmatched: Vec::new(),
            }
        }
        QuestionFile::Jsonl(q) => q,
    };
    let ids: HashSet<&str> = corpus.iter().map(|(id, _)| id.as_str()).collect();
    let folded: Vec<String> = corpus.iter().map(|(_, t)| fold(t)).collect();
    let mut data = BeirDataset {
        corpus: corpus.to_vec(),
        queries: Vec::new(),
        qrels: HashMap::new(),
    };
    let mut unmatched = Vec::new();
    for (n, q) in questions.iter().enumerate() {
        let mut relevant = HashSet::new();
        for entry in q.relevant.iter().filter(|r| !r.trim().is_empty()) {
            if ids.contains(entry.as_str()) {
                relevant.insert(entry.clone());
                continue;
            }
            let passage = fold(entry);
            let before = relevant.len();
            for (i, text) in folded.iter().enumerate() {
                if !text.is_empty() && (text.contains(&passage) || passage.contains(text.as_str()))
                {
                    relevant.insert(corpus[i].0.clone());
                }
            }
            if relevant.len() == before {
                let shown: String = entry.chars().take(60).collect();
                unmatched.push(format!("question {}: \"{shown}\"", n + 1));
            }
        }
        if !relevant.is_empty() {
            let id = format!("q{}", n + 1);
            data.queries.push((id.clone(), q.query.clone()));
            data.qrels.insert(id, relevant);
        }
    }
    Resolved { data, unmatched }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<(String, String)> {
        [
            (
                "a_chunk_0",
                "VACUUM reclaims storage occupied by dead tuples.",
            ),
            (
                "a_chunk_1",
                "Dead tuples are  left by UPDATE and DELETE;\nVACUUM reclaims them.",
            ),
            ("b_chunk_0", "CREATE INDEX builds an index on a table."),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    #[test]
    fn ids_and_passages_find_their_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"query\": \"how do I free space?\", \"relevant\": [\"vacuum RECLAIMS\"]}\n",
                "\n",
                "{\"query\": \"how do I index?\", \"relevant\": [\"b_chunk_0\", \"not in the corpus\"]}\n",
                "{\"query\": \"unknown\", \"relevant\": [\"nowhere\"]}\n",
            ),
        )
        .unwrap();
        let r = resolve(read(&path).unwrap(), &corpus());
        assert_eq!(
            r.data.queries.len(),
            2,
            "the unmatched question is left out"
        );
        let vac = &r.data.qrels["q1"];
        assert_eq!(
            vac.len(),
            2,
            "a passage marks every chunk that holds it: {vac:?}"
        );
        assert_eq!(r.data.qrels["q2"], HashSet::from(["b_chunk_0".to_string()]));
        assert_eq!(r.unmatched.len(), 2, "{:?}", r.unmatched);
        assert!(r.unmatched[0].contains("question 2") && r.unmatched[1].contains("question 3"));
    }

    #[test]
    fn a_passage_longer_than_a_chunk_marks_the_chunks_it_spans() {
        let long = "Intro. VACUUM reclaims storage occupied by dead tuples. Dead tuples are left \
                    by UPDATE and DELETE; VACUUM reclaims them. More.";
        let file = QuestionFile::Jsonl(vec![Question {
            query: "what does vacuum do?".into(),
            relevant: vec![long.into()],
        }]);
        let r = resolve(file, &corpus());
        assert_eq!(r.data.qrels["q1"].len(), 2);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        for (body, want) in [
            ("{\"question\": \"x\"}\n", "q.jsonl:1: expected"),
            (
                "\n{\"query\": \" \", \"relevant\": [\"a\"]}\n",
                "q.jsonl:2: the query is empty",
            ),
            ("{\"query\": \"x\", \"relevant\": []}\n", "no relevant"),
            ("\n\n", "no questions"),
        ] {
            std::fs::write(&path, body).unwrap();
            let err = read(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let err = read(&dir.path().join("absent.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("absent.jsonl") && err.contains("JSONL"),
            "{err}"
        );
        // A directory is read as BEIR and must be complete.
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corpus.jsonl"), "{err}");
    }
}
