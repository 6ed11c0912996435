//! Training pairs in the ragd F-058 JSONL layout: one object per line with `query`, `positive`
//! and optional `negatives` (objects `{"id", "text"}` or plain strings); other fields
//! (`positive_id`, `source_document`) are accepted and ignored.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors raised while reading training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file cannot be opened or read.
    #[error("{path}: cannot read training data: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a valid pair.
    #[error(
        "{path}:{line}: {message} (each line must be a JSON object with non-empty \
             \"query\" and \"positive\" strings and optional \"negatives\")"
    )]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The file holds no pairs.
    #[error("{path}: no training pairs found")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A file of training rows cannot be written.
    #[error("{path}: cannot write training rows: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// One training example: a query, its positive passage and optional hard negatives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainPair {
    /// The query (anchor).
    pub query: String,
    /// The relevant passage.
    pub positive: String,
    /// Mined hard negatives.
    pub negatives: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Negative {
    Text(String),
    Object { text: String },
}

#[derive(Deserialize)]
struct Line {
    query: Option<String>,
    positive: Option<String>,
    #[serde(default)]
    negatives: Vec<Negative>,
}

/// Parses JSONL text; `path` is only used in error messages. Blank lines are skipped.
pub fn parse_pairs(text: impl BufRead, path: &Path) -> Result<Vec<TrainPair>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| DataError::Line {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let parsed: Line =
            serde_json::from_str(&line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let query = parsed.query.filter(|q| !q.trim().is_empty());
        let positive = parsed.positive.filter(|p| !p.trim().is_empty());
        let (Some(query), Some(positive)) = (query, positive) else {
            return Err(bad("missing or empty \"query\" or \"positive\"".into()));
        };
        let negatives = parsed
            .negatives
            .into_iter()
            .map(|n| match n {
                Negative::Text(t) | Negative::Object { text: t } => t,
            })
            .collect();
        out.push(TrainPair {
            query,
            positive,
            negatives,
        });
    }
    if out.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Reads a JSONL training file.
pub fn read_pairs(path: &Path) -> Result<Vec<TrainPair>, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let pairs = parse_pairs(std::io::BufReader::new(file), path)?;
    tracing::info!(path = %path.display(), pairs = pairs.len(), "read training pairs");
    Ok(pairs)
}

/// BLAKE3 hash (hex) of a file's bytes, recorded in training metadata.
pub fn file_hash(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// What [`uniform_negatives`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NegativeFill {
    /// Negatives per pair after the fill (every pair has exactly this many).
    pub per_pair: usize,
    /// Pairs that were short and got passages added.
    pub filled_pairs: usize,
    /// Passages added in all.
    pub added: usize,
}

/// Gives every pair the same number of negatives (every batch needs the same number of negative
/// columns), without throwing mined negatives away: the count is the most any pair has, and a
/// pair short of it is filled with passages drawn at random (seeded) from the passages of the
/// file (positives and negatives of other pairs), never its own positive or a duplicate. Only
/// when the file holds too few distinct passages is the count lowered to what every pair can
/// reach.
pub fn uniform_negatives(pairs: &mut [TrainPair], seed: u64) -> NegativeFill {
    let want = pairs.iter().map(|p| p.negatives.len()).max().unwrap_or(0);
    fill_negatives(pairs, want, seed)
}

/// Gives every pair exactly `want` negatives: longer lists are cut (hardest kept), shorter ones
/// filled as [`uniform_negatives`] does; the count is lowered only when the file holds too few
/// distinct passages for every pair to reach `want`.
pub fn fill_negatives(pairs: &mut [TrainPair], want: usize, seed: u64) -> NegativeFill {
    for p in pairs.iter_mut() {
        p.negatives.truncate(want);
    }
    if want == 0 {
        return NegativeFill::default();
    }
    let mut pool: Vec<&str> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in pairs.iter() {
        for text in std::iter::once(&p.positive).chain(&p.negatives) {
            if seen.insert(text.as_str()) {
                pool.push(text.as_str());
            }
        }
    }
    let pool: Vec<String> = pool.into_iter().map(str::to_string).collect();
    let mut rng = crate::rng::Rng::new(seed);
    let mut fill = NegativeFill::default();
    for p in pairs.iter_mut() {
        let short = want.saturating_sub(p.negatives.len());
        if short == 0 {
            continue;
        }
        let before = p.negatives.len();
        // Random draws first (cheap when the pool is large), then a scan if they keep hitting
        // excluded passages (a small pool).
        for _ in 0..short * 8 {
            if p.negatives.len() == want {
                break;
            }
            let candidate = &pool[rng.below(pool.len())];
            if *candidate != p.positive && !p.negatives.contains(candidate) {
                p.negatives.push(candidate.clone());
            }
        }
        let start = rng.below(pool.len());
        for i in 0..pool.len() {
            if p.negatives.len() == want {
                break;
            }
            let candidate = &pool[(start + i) % pool.len()];
            if *candidate != p.positive && !p.negatives.contains(candidate) {
                p.negatives.push(candidate.clone());
            }
        }
        fill.filled_pairs += 1;
        fill.added += p.negatives.len() - before;
    }
    let per_pair = pairs.iter().map(|p| p.negatives.len()).min().unwrap_or(0);
    for p in pairs.iter_mut() {
        p.negatives.truncate(per_pair);
    }
    fill.per_pair = per_pair;
    fill
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<TrainPair>, DataError> {
        parse_pairs(s.as_bytes(), Path::new("pairs.jsonl"))
    }

    #[test]
    fn reads_f058_layout_and_plain_strings() {
        let text = r#"{"query":"q1","positive":"p1","positive_id":"d1","negatives":[{"id":"d2","text":"n1"}],"source_document":"x"}

{"query":"q2","positive":"p2","negatives":["n2","n3"]}
{"query":"q3","positive":"p3"}"#;
        let pairs = parse(text).unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[0].negatives, vec!["n1"]);
        assert_eq!(pairs[1].negatives, vec!["n2", "n3"]);
        assert!(pairs[2].negatives.is_empty());
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let err = parse("{\"query\":\"q\",\"positive\":\"p\"}\n{\"query\": 3}\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("pairs.jsonl:2: invalid JSON"), "{msg}");
        let msg = parse("\n\n{\"query\":\"q\"}").unwrap_err().to_string();
        assert!(msg.starts_with("pairs.jsonl:3: missing"), "{msg}");
        let msg = parse("{\"query\":\"q\",\"positive\":\"  \"}")
            .unwrap_err()
            .to_string();
        assert!(msg.contains(":1:"), "{msg}");
        let msg = parse("\n").unwrap_err().to_string();
        assert!(msg.contains("no training pairs"), "{msg}");
    }

    #[test]
    fn a_pair_without_negatives_no_longer_removes_the_others() {
        let mut pairs = parse(
            "{\"query\":\"a\",\"positive\":\"b\",\"negatives\":[\"x\",\"y\"]}\n\
             {\"query\":\"c\",\"positive\":\"d\",\"negatives\":[\"z\"]}\n\
             {\"query\":\"e\",\"positive\":\"f\"}",
        )
        .unwrap();
        let fill = uniform_negatives(&mut pairs, 7);
        assert_eq!(fill.per_pair, 2);
        assert_eq!((fill.filled_pairs, fill.added), (2, 3));
        // The mined ones are kept, in order; fills are never the pair's positive or a repeat.
        assert_eq!(pairs[0].negatives, vec!["x", "y"]);
        assert_eq!(pairs[1].negatives[0], "z");
        for p in &pairs {
            assert_eq!(p.negatives.len(), 2);
            assert!(!p.negatives.contains(&p.positive), "{p:?}");
            assert_ne!(p.negatives[0], p.negatives[1], "{p:?}");
        }
        // Seeded: the same fill again.
        let mut again = parse(
            "{\"query\":\"a\",\"positive\":\"b\",\"negatives\":[\"x\",\"y\"]}\n\
             {\"query\":\"c\",\"positive\":\"d\",\"negatives\":[\"z\"]}\n\
             {\"query\":\"e\",\"positive\":\"f\"}",
        )
        .unwrap();
        uniform_negatives(&mut again, 7);
        assert_eq!(again, pairs);
    }

    #[test]
    fn too_few_passages_lower_the_count_to_what_every_pair_reaches() {
        // Two distinct passages in all: the second pair can get only one negative ("b").
        let mut pairs = parse(
            "{\"query\":\"q1\",\"positive\":\"b\",\"negatives\":[\"x\",\"x\"]}\n\
             {\"query\":\"q2\",\"positive\":\"x\"}",
        )
        .unwrap();
        let fill = uniform_negatives(&mut pairs, 1);
        assert_eq!(fill.per_pair, 1);
        assert_eq!(pairs[1].negatives, vec!["b"]);
        assert_eq!(pairs[0].negatives, vec!["x"]);
        let mut none = parse("{\"query\":\"q\",\"positive\":\"p\"}").unwrap();
        assert_eq!(uniform_negatives(&mut none, 1), NegativeFill::default());
    }

    #[test]
    fn hash_changes_with_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, "x").unwrap();
        let h1 = file_hash(&p).unwrap();
        std::fs::write(&p, "y").unwrap();
        assert_ne!(h1, file_hash(&p).unwrap());
        assert_eq!(h1.len(), 64);
    }
}
