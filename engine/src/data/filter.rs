//! Quality filters for generated queries, with a count per reason:
//! - length bounds (words and characters);
//! - near-duplicates: the same question (normalised words) anywhere in the shard, or one whose
//!   word set overlaps an earlier question of the same chunk by Jaccard >= the threshold;
//! - copies: a question repeating a run of `copy_span_words` consecutive words of its positive
//!   (except an ICT sentence left in its whole chunk on purpose: `--ict-keep-sentence`);
//! - an optional LLM-as-judge yes/no check ([`judge_filter`]);
//! - round-trip consistency ([`round_trip_filter`]): keep a query only if the embedder ranks its
//!   source chunk in the top k of the whole corpus.
use std::collections::{BTreeMap, HashMap, HashSet};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::chunk::Chunk;
use super::embed::{words, EmbedError, EmbeddingMatrix};
use super::llm::generate::{GeneratedQuery, QuerySource};
use super::llm::{ChatRequest, LlmBackend};
use super::search::{exact_top_k, SearchBlocks, SearchError};
use super::ProgressSender;

/// Filter errors.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A query names a chunk that is not in the corpus.
    #[error("query {query:?} names chunk {chunk_id}, which is not in the corpus")]
    UnknownChunk {
        /// The query.
        query: String,
        /// The chunk id.
        chunk_id: String,
    },
    /// Embedding failed.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// The search failed.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// Inputs disagree in size.
    #[error("round-trip inputs disagree: {what}")]
    Shape {
        /// Which sizes differ.
        what: String,
    },
    /// The run was cancelled.
    #[error("filtering cancelled")]
    Cancelled,
}

/// Why a query was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Under the minimum length.
    TooShort,
    /// Over the maximum length.
    TooLong,
    /// A (near-)duplicate of an earlier question.
    NearDuplicate,
    /// Copies a long span of its positive.
    CopiesPositive,
    /// The LLM judge said the passage does not answer it.
    JudgeRejected,
    /// The source chunk is not in the embedder's top k for it.
    RoundTrip,
}

/// Drops per reason.
pub type FilterCounts = BTreeMap<DropReason, usize>;

/// Text-filter settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterConfig {
    /// Fewest words.
    pub min_words: usize,
    /// Most words.
    pub max_words: usize,
    /// Fewest characters.
    pub min_chars: usize,
    /// Most characters.
    pub max_chars: usize,
    /// Word-set Jaccard at or above which two questions of one chunk are near-duplicates.
    pub near_duplicate_jaccard: f64,
    /// Consecutive words shared with the positive that make a copy (0 disables).
    pub copy_span_words: usize,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            min_words: 3,
            max_words: 48,
            min_chars: 10,
            max_chars: 400,
            near_duplicate_jaccard: 0.8,
            copy_span_words: 10,
        }
    }
}

/// Longest run of consecutive words `a` and `b` share.
pub fn longest_common_run(a: &[String], b: &[String]) -> usize {
    let mut best = 0;
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            if x == y {
                cur[j + 1] = prev[j] + 1;
                best = best.max(cur[j + 1]);
            }
        }
        prev = cur;
    }
    best
}

fn jaccard(a: &HashSet<String>, b: &HashSet<String>) -> f64 {
    let inter = a.intersection(b).count();
    let union = a.len() + b.len() - inter;
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// The text of a query's positive: its own (ICT) or its chunk's.
pub fn positive_text<'a>(q: &'a GeneratedQuery, chunk: &'a Chunk) -> &'a str {
    q.positive_text.as_deref().unwrap_or(&chunk.text)
}

/// An ICT pair whose positive is the whole chunk, its sentence left in on purpose (the ICT
/// paper's share of pairs that teach word overlap): a copy by design, not a lazy question.
fn is_kept_ict_sentence(q: &GeneratedQuery) -> bool {
    matches!(q.source, QuerySource::Ict) && q.positive_text.is_none()
}

/// Applies the length, near-duplicate and copy filters, keeping order.
pub fn text_filters(
    queries: Vec<GeneratedQuery>,
    chunks: &HashMap<&str, &Chunk>,
    config: &FilterConfig,
) -> Result<(Vec<GeneratedQuery>, FilterCounts), FilterError> {
    let mut counts = FilterCounts::new();
    let mut kept = Vec::with_capacity(queries.len());
    let mut seen_exact = HashSet::new();
    let mut per_chunk: HashMap<String, Vec<HashSet<String>>> = HashMap::new();
    for q in queries {
        let chunk = chunks
            .get(q.chunk_id.as_str())
            .ok_or_else(|| FilterError::UnknownChunk {
                query: q.query.clone(),
                chunk_id: q.chunk_id.clone(),
            })?;
        let w = words(&q.query);
        let chars = q.query.chars().count();
        let reason = if w.len() < config.min_words || chars < config.min_chars {
            Some(DropReason::TooShort)
        } else if w.len() > config.max_words || chars > config.max_chars {
            Some(DropReason::TooLong)
        } else if !seen_exact.insert(w.join(" ")) {
            Some(DropReason::NearDuplicate)
        } else {
            let set: HashSet<String> = w.iter().cloned().collect();
            let earlier = per_chunk.entry(q.chunk_id.clone()).or_default();
            if earlier
                .iter()
                .any(|e| jaccard(e, &set) >= config.near_duplicate_jaccard)
            {
                Some(DropReason::NearDuplicate)
            } else if config.copy_span_words > 0
                && !is_kept_ict_sentence(&q)
                && longest_common_run(&w, &words(positive_text(&q, chunk)))
                    >= config.copy_span_words
            {
                Some(DropReason::CopiesPositive)
            } else {
                earlier.push(set);
                None
            }
        };
        match reason {
            Some(r) => *counts.entry(r).or_default() += 1,
            None => kept.push(q),
        }
    }
    Ok((kept, counts))
}

/// The judge's prompt.
pub const JUDGE_PROMPT: &str = "Passage:\n---\n{passage}\n---\n\nQuestion: {question}\n\nDoes the passage answer the question? Answer in JSON: {\"answer\": \"yes\"} or {\"answer\": \"no\"}.";

/// Reads a yes/no verdict: JSON `{"answer": ...}` or a leading yes/no word.
pub fn parse_verdict(text: &str) -> Option<bool> {
    let value = serde_json::from_str::<serde_json::Value>(text.trim())
        .ok()
        .and_then(|v| v.get("answer").and_then(|a| a.as_str()).map(str::to_string));
    let s = value.unwrap_or_else(|| text.to_string()).to_lowercase();
    let first = s
        .split(|c: char| !c.is_alphabetic())
        .find(|w| !w.is_empty())?;
    match first {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Counts of the judge besides its rejections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JudgeCounts {
    /// Queries judged.
    pub judged: usize,
    /// Verdicts that could not be read or requests that failed; those queries are kept.
    pub unreadable: usize,
}

/// Asks an LLM whether each query's positive answers it; drops the ones judged "no".
pub async fn judge_filter(
    queries: Vec<GeneratedQuery>,
    chunks: &HashMap<&str, &Chunk>,
    backend: &dyn LlmBackend,
    concurrency: usize,
    counts: &mut FilterCounts,
    cancel: &CancellationToken,
) -> Result<(Vec<GeneratedQuery>, JudgeCounts), FilterError> {
    let schema = json!({
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
    });
    let mut jc = JudgeCounts::default();
    let mut requests = Vec::with_capacity(queries.len());
    for q in &queries {
        let chunk = chunks
            .get(q.chunk_id.as_str())
            .ok_or_else(|| FilterError::UnknownChunk {
                query: q.query.clone(),
                chunk_id: q.chunk_id.clone(),
            })?;
        requests.push(ChatRequest {
            system: None,
            user: JUDGE_PROMPT
                .replace("{passage}", positive_text(q, chunk))
                .replace("{question}", &q.query),
            schema: Some(schema.clone()),
            temperature: 0.0,
            seed: Some(0),
            max_tokens: 16,
        });
    }
    let verdicts: Vec<Option<bool>> = {
        let stream = futures::stream::iter(requests)
            .map(|r: ChatRequest| async move {
                match backend.chat(&r).await {
                    Ok(reply) => parse_verdict(&reply.text),
                    Err(e) => {
                        tracing::warn!(error = %e, "judge request failed; keeping the query");
                        None
                    }
                }
            })
            .buffered(concurrency.max(1));
        tokio::select! {
            _ = cancel.cancelled() => return Err(FilterError::Cancelled),
            v = stream.collect::<Vec<_>>() => v,
        }
    };
    let mut kept = Vec::with_capacity(queries.len());
    for (q, verdict) in queries.into_iter().zip(verdicts) {
        jc.judged += 1;
        match verdict {
            Some(false) => *counts.entry(DropReason::JudgeRejected).or_default() += 1,
            Some(true) => kept.push(q),
            None => {
                jc.unreadable += 1;
                kept.push(q);
            }
        }
    }
    Ok((kept, jc))
}

/// Round-trip consistency: for each query row, whether its source chunk (`source_rows[i]`) is
/// among the `k` corpus rows most similar to it. Blocking.
pub fn round_trip_keep(
    query_embeddings: &EmbeddingMatrix,
    source_rows: &[usize],
    corpus: &EmbeddingMatrix,
    k: usize,
    progress: Option<&ProgressSender>,
    cancel: &CancellationToken,
) -> Result<Vec<bool>, FilterError> {
    if source_rows.len() != query_embeddings.len() {
        return Err(FilterError::Shape {
            what: format!(
                "{} query embeddings for {} source rows",
                query_embeddings.len(),
                source_rows.len()
            ),
        });
    }
    let hits = exact_top_k(
        query_embeddings,
        corpus,
        k,
        SearchBlocks::default(),
        progress,
        cancel,
    )?;
    Ok(hits
        .iter()
        .zip(source_rows)
        .map(|(h, &src)| h.iter().any(|hit| hit.index == src))
        .collect())
}

/// Keeps the queries `keep` marks, counting the others as [`DropReason::RoundTrip`].
pub fn round_trip_filter<T>(items: Vec<T>, keep: &[bool], counts: &mut FilterCounts) -> Vec<T> {
    let mut out = Vec::with_capacity(items.len());
    for (item, &k) in items.into_iter().zip(keep) {
        if k {
            out.push(item);
        } else {
            *counts.entry(DropReason::RoundTrip).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::embed::{embed_all, HashingEmbedder};
    fn chunk(id: &str, text: &str) -> Chunk {
        Chunk {
            id: id.into(),
            document_id: "d".into(),
            text: text.into(),
        }
    }

    fn q(text: &str, chunk: &str) -> GeneratedQuery {
        GeneratedQuery {
            query: text.into(),
            chunk_id: chunk.into(),
            positive_text: None,
            source: QuerySource::Llm,
        }
    }

    #[test]
    fn an_ict_sentence_kept_in_its_chunk_is_no_copy() {
        let text = "The autovacuum launcher starts worker processes that vacuum and analyze tables whose statistics say they need it. Nothing else runs.";
        let c1 = chunk("c1", text);
        let map: HashMap<&str, &Chunk> = [("c1", &c1)].into_iter().collect();
        let sentence = "The autovacuum launcher starts worker processes that vacuum and analyze tables whose statistics say they need it.";
        let ict = |positive: Option<&str>| GeneratedQuery {
            query: sentence.into(),
            chunk_id: "c1".into(),
            positive_text: positive.map(str::to_owned),
            source: QuerySource::Ict,
        };
        // Kept on purpose (whole chunk as positive): stays. The same sentence as the positive of
        // a cut chunk, or written by an LLM, is a copy.
        let (kept, counts) = text_filters(vec![ict(None)], &map, &FilterConfig::default()).unwrap();
        assert_eq!(kept.len(), 1, "{counts:?}");
        let (kept, counts) =
            text_filters(vec![ict(Some(text))], &map, &FilterConfig::default()).unwrap();
        assert!(kept.is_empty());
        assert_eq!(counts.get(&DropReason::CopiesPositive), Some(&1));
        let (kept, _) =
            text_filters(vec![q(sentence, "c1")], &map, &FilterConfig::default()).unwrap();
        assert!(kept.is_empty());
    }

    #[test]
    fn text_filters_count_each_reason() {
        let c1 = chunk("c1", "The autovacuum launcher starts worker processes that vacuum and analyze tables whose statistics say they need it.");
        let c2 = chunk("c2", "Checkpoints flush dirty buffers to disk.");
        let map: HashMap<&str, &Chunk> = [("c1", &c1), ("c2", &c2)].into_iter().collect();
        let queries = vec![
            q("What starts autovacuum workers?", "c1"),
            q("Why?", "c1"),
            q(&format!("What {}?", "very ".repeat(60)), "c1"),
            q("what starts AUTOVACUUM workers", "c2"),
            q("What starts the autovacuum workers?", "c1"),
            q("Is it true that the autovacuum launcher starts worker processes that vacuum and analyze tables whose statistics say so?", "c1"),
            q("When are dirty buffers flushed?", "c2"),
        ];
        let (kept, counts) = text_filters(queries, &map, &FilterConfig::default()).unwrap();
        let texts: Vec<_> = kept.iter().map(|q| q.query.as_str()).collect();
        assert_eq!(
            texts,
            [
                "What starts autovacuum workers?",
                "When are dirty buffers flushed?"
            ]
        );
        assert_eq!(counts.get(&DropReason::TooShort), Some(&1));
        assert_eq!(counts.get(&DropReason::TooLong), Some(&1));
        assert_eq!(counts.get(&DropReason::NearDuplicate), Some(&2));
        assert_eq!(counts.get(&DropReason::CopiesPositive), Some(&1));
        let err = text_filters(
            vec![q("Where is chunk nine?", "c9")],
            &map,
            &FilterConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("c9"));
    }

    #[test]
    fn verdicts() {
        assert_eq!(parse_verdict("{\"answer\": \"yes\"}"), Some(true));
        assert_eq!(parse_verdict("No, it does not."), Some(false));
        assert_eq!(parse_verdict("maybe"), None);
    }

    #[test]
    fn round_trip_keeps_queries_that_find_their_chunk() {
        let texts: Vec<String> = [
            "VACUUM reclaims storage occupied by dead tuples.",
            "The bash shell reads bashrc at startup for interactive shells.",
            "Git stores objects in a content addressed database.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let e = HashingEmbedder::new(512);
        let cancel = CancellationToken::new();
        let corpus = embed_all(&e, &texts, 8, "embed", None, &cancel).unwrap();
        let queries: Vec<String> = [
            "Which command reclaims dead tuples storage?",
            "How does git store objects?",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let qe = embed_all(&e, &queries, 8, "embed", None, &cancel).unwrap();
        // The first query's true source is row 0; the second is attributed to row 1 (wrong).
        let keep = round_trip_keep(&qe, &[0, 1], &corpus, 1, None, &cancel).unwrap();
        assert_eq!(keep, [true, false]);
        let mut counts = FilterCounts::new();
        let kept = round_trip_filter(queries, &keep, &mut counts);
        assert_eq!(kept.len(), 1);
        assert_eq!(counts.get(&DropReason::RoundTrip), Some(&1));
    }
}
