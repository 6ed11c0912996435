//! Held-out test split by source document: every query of a document lands on the same side, so
//! no neighbour of a training chunk (same page, overlapping window) is graded as unseen. The
//! documents with queries are ordered by a seeded hash of their id and taken in that order until
//! the test side holds `fraction` of the queries (a document that would push it past twice the
//! fraction is passed over): seeded, and independent of input order. A corpus whose queries come
//! from a single document falls back to the same rule over chunks, and the split says so.
//!
//! When an LLM wrote some queries and ICT the rest (`--llm X+ict`), the test side is made of LLM
//! questions only: documents are held out by their LLM questions (the fraction counts those), and
//! the ICT sentences of a held-out document are set aside, neither trained on nor graded. ICT
//! sentences are copied out of their chunks and flatter a model; questions read like a user's.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::llm::generate::{chunk_seed, GeneratedQuery, QuerySource};

/// Split errors.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The fraction is outside [0, 1).
    #[error(
        "test fraction {fraction} must be at least 0 and below 1 (0.1 holds out 10% of the chunks)"
    )]
    BadFraction {
        /// The fraction given.
        fraction: f64,
    },
}

/// Split settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    /// Share of chunks held out (default 0.1).
    pub test_fraction: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            test_fraction: 0.1,
            seed: 42,
        }
    }
}

/// What the split kept together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitUnit {
    /// Whole source documents (the rule).
    #[default]
    Document,
    /// Chunks: the queries came from a single document.
    Chunk,
}

/// Train and test queries, and the chunks held out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Split {
    /// Training queries, input order kept.
    pub train: Vec<GeneratedQuery>,
    /// Test queries, input order kept.
    pub test: Vec<GeneratedQuery>,
    /// Ids of the chunks whose queries are held out.
    pub test_chunks: BTreeSet<String>,
    /// Held-out units (documents or chunks).
    pub test_units: usize,
    /// What was kept together.
    pub unit: SplitUnit,
    /// ICT queries of held-out units left out of both sides (LLM questions were held out).
    pub set_aside_ict: usize,
}

impl Split {
    /// Test queries by source: (LLM-written, ICT).
    pub fn test_sources(&self) -> (usize, usize) {
        let llm = self
            .test
            .iter()
            .filter(|q| q.source == QuerySource::Llm)
            .count();
        (llm, self.test.len() - llm)
    }
}

/// Splits queries by source document (`document_of` maps chunk ids to document ids; a chunk
/// missing from it is its own document), falling back to chunks when only one document has
/// queries.
pub fn split_held_out(
    queries: Vec<GeneratedQuery>,
    document_of: &HashMap<String, String>,
    config: &SplitConfig,
) -> Result<Split, SplitError> {
    if !(0.0..1.0).contains(&config.test_fraction) || config.test_fraction.is_nan() {
        return Err(SplitError::BadFraction {
            fraction: config.test_fraction,
        });
    }
    let doc = |q: &GeneratedQuery| -> String {
        document_of
            .get(&q.chunk_id)
            .cloned()
            .unwrap_or_else(|| q.chunk_id.clone())
    };
    let by_chunk = |q: &GeneratedQuery| q.chunk_id.clone();
    let has = |s: QuerySource| queries.iter().any(|q| q.source == s);
    let llm_only = has(QuerySource::Llm) && has(QuerySource::Ict);
    let graded: Vec<&GeneratedQuery> = queries
        .iter()
        .filter(|q| !llm_only || q.source == QuerySource::Llm)
        .collect();
    let target = config.test_fraction * graded.len() as f64;
    let mut unit = SplitUnit::Document;
    let mut held = held_out(&graded, &doc, target, config.seed);
    if held.is_empty() && target >= 0.5 {
        unit = SplitUnit::Chunk;
        held = held_out(&graded, &by_chunk, target, config.seed);
    }
    let key: &dyn Fn(&GeneratedQuery) -> String = match unit {
        SplitUnit::Document => &doc,
        SplitUnit::Chunk => &by_chunk,
    };
    let mut split = Split {
        unit,
        test_units: held.len(),
        ..Split::default()
    };
    for q in queries {
        if held.contains(&key(&q)) {
            split.test_chunks.insert(q.chunk_id.clone());
            if llm_only && q.source == QuerySource::Ict {
                split.set_aside_ict += 1;
            } else {
                split.test.push(q);
            }
        } else {
            split.train.push(q);
        }
    }
    Ok(split)
}

/// The units (by `key`) held out: in seeded-hash order, until the held-out queries round to
/// `target`; a unit that would take them past twice the target is passed over, and one unit is
/// always left for training. Empty when no unit fits (one unit only, or every unit too big).
fn held_out(
    queries: &[&GeneratedQuery],
    key: &dyn Fn(&GeneratedQuery) -> String,
    target: f64,
    seed: u64,
) -> HashSet<String> {
    let mut per_unit: BTreeMap<String, usize> = BTreeMap::new();
    for q in queries {
        *per_unit.entry(key(q)).or_default() += 1;
    }
    let mut order: Vec<(u64, &str, usize)> = per_unit
        .iter()
        .map(|(id, &n)| (chunk_seed(seed ^ 0x5eed_5e11, id), id.as_str(), n))
        .collect();
    order.sort();
    let mut held = HashSet::new();
    let mut taken = 0usize;
    for (_, id, n) in order.iter().copied() {
        if taken as f64 >= target - 0.5 || held.len() + 1 >= per_unit.len() {
            break;
        }
        if (taken + n) as f64 > (2.0 * target).max(1.0) {
            continue;
        }
        held.insert(id.to_string());
        taken += n;
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_both_sources_only_llm_questions_are_graded() {
        // Chunks 0..19 have LLM questions, 20..39 ICT sentences; documents of 2 chunks.
        let mixed: Vec<GeneratedQuery> = queries()
            .into_iter()
            .map(|mut q| {
                let c: usize = q.chunk_id["doc_chunk_".len()..].parse().unwrap();
                if c >= 20 {
                    q.source = QuerySource::Ict;
                }
                q
            })
            .collect();
        // Mixed documents too: chunk 19 (LLM) and 20 (ICT) share one.
        let mut docs = documents(2);
        docs.insert("doc_chunk_20".into(), docs["doc_chunk_19"].clone());
        for seed in 0..20 {
            let config = SplitConfig {
                seed,
                ..Default::default()
            };
            let s = split_held_out(mixed.clone(), &docs, &config).unwrap();
            // 10% of the 60 LLM questions, held out by document (6 per document).
            assert_eq!(s.test_sources(), (6, 0), "seed {seed}");
            let test_docs: HashSet<_> = s.test.iter().map(|q| &docs[&q.chunk_id]).collect();
            assert!(s
                .train
                .iter()
                .all(|q| !test_docs.contains(&docs[&q.chunk_id])));
            let mixed_doc_held = test_docs.contains(&docs["doc_chunk_20"]);
            assert_eq!(s.set_aside_ict, if mixed_doc_held { 3 } else { 0 });
            assert_eq!(s.train.len() + s.test.len() + s.set_aside_ict, 120);
        }
        // One source only: graded as before.
        let s = split(&documents(5), 1);
        assert_eq!((s.test_sources(), s.set_aside_ict), ((15, 0), 0));
    }

    /// 40 chunks with 3 questions each, in documents of `per_doc` chunks.
    fn queries() -> Vec<GeneratedQuery> {
        (0..40)
            .flat_map(|c| {
                (0..3).map(move |k| GeneratedQuery {
                    query: format!("question {k} about chunk {c}?"),
                    chunk_id: format!("doc_chunk_{c}"),
                    positive_text: None,
                    source: QuerySource::Llm,
                })
            })
            .collect()
    }

    fn documents(per_doc: usize) -> HashMap<String, String> {
        (0..40)
            .map(|c| (format!("doc_chunk_{c}"), format!("doc{}", c / per_doc)))
            .collect()
    }

    fn split(docs: &HashMap<String, String>, seed: u64) -> Split {
        let config = SplitConfig {
            seed,
            ..Default::default()
        };
        split_held_out(queries(), docs, &config).unwrap()
    }

    #[test]
    fn documents_never_straddle_and_the_fraction_is_kept() {
        let docs = documents(5);
        for seed in 0..20 {
            let s = split(&docs, seed);
            assert_eq!(s.unit, SplitUnit::Document);
            // 8 documents of 15 questions: one document is the closest to 12 of 120.
            assert_eq!((s.test_units, s.test.len(), s.train.len()), (1, 15, 105));
            let train_docs: HashSet<_> = s.train.iter().map(|q| &docs[&q.chunk_id]).collect();
            assert!(s
                .test
                .iter()
                .all(|q| !train_docs.contains(&docs[&q.chunk_id])));
            assert_eq!(s.test_chunks.len(), 5);
        }
    }

    #[test]
    fn one_document_falls_back_to_chunks() {
        let s = split(&documents(40), 42);
        assert_eq!(s.unit, SplitUnit::Chunk);
        assert_eq!((s.test_units, s.test.len(), s.train.len()), (4, 12, 108));
        let train_chunks: HashSet<_> = s.train.iter().map(|q| q.chunk_id.clone()).collect();
        assert!(s.test.iter().all(|q| !train_chunks.contains(&q.chunk_id)));
    }

    #[test]
    fn a_giant_document_is_not_held_out() {
        // Chunks 0..29 are one document (90 questions); 10 small documents of 1 chunk each.
        let docs: HashMap<String, String> = (0..40)
            .map(|c| {
                let d = if c < 30 {
                    "big".to_string()
                } else {
                    format!("small{c}")
                };
                (format!("doc_chunk_{c}"), d)
            })
            .collect();
        for seed in 0..20 {
            let s = split(&docs, seed);
            assert_eq!(s.unit, SplitUnit::Document);
            assert_eq!(s.test.len(), 12, "seed {seed}");
            assert!(s.test.iter().all(|q| docs[&q.chunk_id] != "big"));
        }
    }

    #[test]
    fn seeded_and_order_independent() {
        let docs = documents(2);
        let a = split(&docs, 42);
        let mut rev = queries();
        rev.reverse();
        let b = split_held_out(rev, &docs, &SplitConfig::default()).unwrap();
        assert_eq!(a.test_chunks, b.test_chunks);
        assert_ne!(a.test_chunks, split(&docs, 7).test_chunks);
        let none = SplitConfig {
            test_fraction: 0.0,
            seed: 1,
        };
        let s = split_held_out(queries(), &docs, &none).unwrap();
        assert_eq!((s.test.len(), s.train.len()), (0, 120));
        for fraction in [1.0, -0.1, f64::NAN] {
            let bad = SplitConfig {
                test_fraction: fraction,
                seed: 1,
            };
            assert!(split_held_out(queries(), &docs, &bad).is_err());
        }
    }
}
