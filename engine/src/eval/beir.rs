//! BEIR-layout test sets: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`,
//! `text`) and `qrels/test.tsv` (`query-id`, `corpus-id`, `score` with a header line).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors raised while reading a BEIR directory.
#[derive(Debug, thiserror::Error)]
pub enum BeirError {
    /// A file cannot be read.
    #[error(
        "{path}: cannot read ({source}); a BEIR test set needs corpus.jsonl, queries.jsonl \
             and qrels/test.tsv"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// A loaded BEIR test set.
#[derive(Debug, Clone, Default)]
pub struct BeirDataset {
    /// Corpus documents: (id, text).
    pub corpus: Vec<(String, String)>,
    /// Queries: (id, text).
    pub queries: Vec<(String, String)>,
    /// Relevant corpus ids per query id (qrels score > 0).
    pub qrels: HashMap<String, HashSet<String>>,
}

#[derive(Deserialize)]
struct Doc {
    #[serde(rename = "_id")]
    id: String,
    #[serde(default)]
    title: String,
    text: String,
}

fn read(path: &Path) -> Result<String, BeirError> {
    std::fs::read_to_string(path).map_err(|source| BeirError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_jsonl(path: &Path) -> Result<Vec<Doc>, BeirError> {
    let mut out = Vec::new();
    for (i, line) in read(path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let d: Doc = serde_json::from_str(line).map_err(|e| BeirError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            message: format!("expected {{\"_id\", \"text\"}}: {e}"),
        })?;
        out.push(d);
    }
    Ok(out)
}

/// Loads `dir`. With `titles`, a document's text is `title + " " + text` (BEIR's convention);
/// without, only `text` (right for sets whose titles are the questions, such as debfaq).
pub fn load(dir: &Path, titles: bool) -> Result<BeirDataset, BeirError> {
    let corpus = read_jsonl(&dir.join("corpus.jsonl"))?
        .into_iter()
        .map(|d| {
            let text = if titles && !d.title.is_empty() {
                format!("{} {}", d.title, d.text)
            } else {
                d.text
            };
            (d.id, text)
        })
        .collect();
    let queries = read_jsonl(&dir.join("queries.jsonl"))?
        .into_iter()
        .map(|d| (d.id, d.text))
        .collect();
    let qpath = dir.join("qrels").join("test.tsv");
    let mut qrels: HashMap<String, HashSet<String>> = HashMap::new();
    for (i, line) in read(&qpath)?.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        if i == 0 && f.first().is_some_and(|s| s.starts_with("query")) || line.trim().is_empty() {
            continue;
        }
        let bad = |message: &str| BeirError::Line {
            path: qpath.clone(),
            line: i + 1,
            message: message.into(),
        };
        if f.len() < 3 {
            return Err(bad("expected query-id<TAB>corpus-id<TAB>score"));
        }
        let score: f64 = f[2]
            .trim()
            .parse()
            .map_err(|_| bad("score is not a number"))?;
        if score > 0.0 {
            qrels
                .entry(f[0].to_string())
                .or_default()
                .insert(f[1].to_string());
        }
    }
    Ok(BeirDataset {
        corpus,
        queries,
        qrels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, qrels: &str) {
        std::fs::create_dir_all(dir.join("qrels")).unwrap();
        std::fs::write(
            dir.join("corpus.jsonl"),
            "{\"_id\":\"d1\",\"title\":\"T\",\"text\":\"body one\"}\n{\"_id\":\"d2\",\"text\":\"body two\"}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("queries.jsonl"),
            "{\"_id\":\"q1\",\"text\":\"what\"}\n",
        )
        .unwrap();
        std::fs::write(dir.join("qrels/test.tsv"), qrels).unwrap();
    }

    #[test]
    fn loads_with_and_without_titles() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n",
        );
        let d = load(dir.path(), false).unwrap();
        assert_eq!(d.corpus[0].1, "body one");
        assert_eq!(d.qrels["q1"], HashSet::from(["d1".to_string()]));
        let d = load(dir.path(), true).unwrap();
        assert_eq!(d.corpus[0].1, "T body one");
        assert_eq!(d.corpus[1].1, "body two");
    }

    #[test]
    fn bad_lines_are_located() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "query-id\tcorpus-id\tscore\nq1 d1 1\n");
        let err = load(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("test.tsv:2"), "{err}");
        std::fs::write(dir.path().join("queries.jsonl"), "{\"id\":1}\n").unwrap();
        let err = load(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("queries.jsonl:1"), "{err}");
        let err = load(&dir.path().join("nope"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("corpus.jsonl"), "{err}");
    }
}
