//! TEMPORARY minimal codec with the agreed API; replaced by the codec branch at merge.
#![allow(missing_docs)]
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;
pub const LEN_PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: u64, max: usize },
    #[error("encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: bincode::error::EncodeError,
    },
    #[error("decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: bincode::error::DecodeError,
    },
    #[error("{extra} trailing bytes after {what}")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("stream ended in the middle of a frame")]
    UnexpectedEof,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let what = std::any::type_name::<T>();
    let v = bincode::serde::encode_to_vec(msg, config())
        .map_err(|source| CodecError::Encode { what, source })?;
    if v.len() > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge {
            len: v.len() as u64,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(v)
}

pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let what = std::any::type_name::<T>();
    let (v, n) = bincode::serde::decode_from_slice(body, config())
        .map_err(|source| CodecError::Decode { what, source })?;
    if n != body.len() {
        return Err(CodecError::TrailingBytes {
            what,
            extra: body.len() - n,
        });
    }
    Ok(v)
}

pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), CodecError> {
    let body = encode(msg)?;
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await?;
    Ok(())
}

pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> Result<Option<T>, CodecError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            CodecError::UnexpectedEof
        } else {
            e.into()
        }
    })?;
    decode(&body).map(Some)
}
