//! The building blocks of the encoder, each from differentiable Candle ops: linear layers
//! (with optional LoRA adapters), layer normalisation, and the transformer block made of them.

use candle_core::{Tensor, Var};

use super::dropout::Dropout;
use super::fused_attention::{attention, TokenLayout};
use super::fused_linear::product;

/// A LoRA adapter on one linear layer: `y += scale * dropout(x) A^T B^T`.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// Down projection, shape (r, in).
    pub a: Var,
    /// Up projection, shape (out, r).
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout on the adapter input.
    pub dropout: f64,
}

/// A linear layer `y = x W^T + b`, optionally with a LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path, such as `encoder.layer.0.attention.self.query`.
    pub module: String,
    /// Weight, shape (out, in).
    pub weight: Tensor,
    /// Bias, shape (out).
    pub bias: Tensor,
    /// Optional LoRA adapter.
    pub lora: Option<LoraLayer>,
}

impl Linear {
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        drop: &mut Dropout<'_>,
    ) -> candle_core::Result<Tensor> {
        let y = super::fused_linear::linear(x, &self.weight, &self.bias)?;
        let Some(lora) = &self.lora else {
            return Ok(y);
        };
        // Any leading dimensions: (batch, tokens) padded or (tokens) packed.
        let h = x.dim(candle_core::D::Minus1)?;
        let xd = drop.apply(&x.reshape(((), h))?, lora.dropout)?;
        let z = xd
            .matmul(&lora.a.as_tensor().t()?)?
            .matmul(&lora.b.as_tensor().t()?)?;
        let z = (z * lora.scale)?.reshape(y.shape())?;
        y + z
    }

    /// `gelu(self.forward(x))`, as one fused op on the CPU when there is no adapter.
    pub(crate) fn forward_gelu(
        &self,
        x: &Tensor,
        drop: &mut Dropout<'_>,
    ) -> candle_core::Result<Tensor> {
        if self.lora.is_none() {
            return super::fused_linear::linear_gelu(x, &self.weight, &self.bias);
        }
        super::fused::gelu(&self.forward(x, drop)?)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        super::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    /// `self.forward(dropout(a + a_bias, p) + x)` (no `a_bias`: `dropout(a, p) + x`): the
    /// residual end of a BERT half-block, one fused op on the CPU.
    pub(crate) fn forward_residual(
        &self,
        (a, a_bias): (&Tensor, Option<&Tensor>),
        x: &Tensor,
        p: f64,
        drop: &mut Dropout<'_>,
    ) -> candle_core::Result<Tensor> {
        let params = (&self.weight, &self.bias);
        super::fused_residual::residual_layer_norm((a, a_bias), x, params, self.eps, p, drop)
    }

    /// `self.forward(a W^T + b + x)` with `(W, b)` = `output`, for inference (no dropout): the
    /// product and the norm in one parallel region on the CPU.
    pub(crate) fn forward_product_residual(
        &self,
        a: &Tensor,
        output: (&Tensor, &Tensor),
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let params = (&self.weight, &self.bias);
        super::fused_residual::product_residual_layer_norm(a, output, x, params, self.eps)
    }
}

/// One transformer block: self-attention, then the feed-forward network, each closed by a
/// residual layer norm.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) query: Linear,
    pub(crate) key: Linear,
    pub(crate) value: Linear,
    pub(crate) attn_out: Linear,
    pub(crate) attn_norm: LayerNorm,
    pub(crate) inter: Linear,
    pub(crate) out: Linear,
    pub(crate) out_norm: LayerNorm,
    /// For inference on detached weights: the attention output's bias with the value's folded
    /// in (see [`Layer::fold_biases`]); `None` runs the layer as written.
    pub(crate) folded: Option<Tensor>,
}

impl Layer {
    /// `b_o + W_o b_v`, where the layer's biases can move for inference (no LoRA adapter on
    /// the key, value or output products). The key's bias adds `q . b_k` to every score of a
    /// query's row, which the softmax cancels, so it is dropped; the value's bias comes out of
    /// the attention unchanged (each row of probabilities sums to one), so it joins the
    /// attention output's bias; both output biases are then added in the residual layer norms.
    /// Four of the layer's six products overwrite their output instead of starting from a
    /// bias fill.
    pub(crate) fn fold_biases(&self) -> candle_core::Result<Option<Tensor>> {
        let adapted = [&self.key, &self.value, &self.attn_out, &self.out];
        if adapted.iter().any(|l| l.lora.is_some()) {
            return Ok(None);
        }
        let w_o = &self.attn_out.weight;
        let carried = w_o.matmul(&self.value.bias.unsqueeze(1)?)?.squeeze(1)?;
        Ok(Some((carried + &self.attn_out.bias)?))
    }

    /// The block's output states for `x` in `layout`, with `heads` attention heads and dropout
    /// `(hidden, attention)` probabilities.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        layout: &TokenLayout,
        heads: usize,
        (hp, ap): (f64, f64),
        drop: &mut Dropout<'_>,
    ) -> candle_core::Result<Tensor> {
        let q = self.query.forward(x, drop)?;
        match self.folded.as_ref().filter(|_| drop.0.is_none()) {
            None => {
                let k = self.key.forward(x, drop)?;
                let v = self.value.forward(x, drop)?;
                let ctx = attention(&q, &k, &v, layout, heads, ap, drop)?;
                let a = self.attn_out.forward(&ctx, drop)?;
                let x1 = self.attn_norm.forward_residual((&a, None), x, hp, drop)?;
                let i = self.inter.forward_gelu(&x1, drop)?;
                let o = self.out.forward(&i, drop)?;
                self.out_norm.forward_residual((&o, None), &x1, hp, drop)
            }
            // Folded biases hold only without dropout (a dropped-out row of attention
            // probabilities no longer sums to one).
            Some(attn_out_bias) => {
                let k = product(x, &self.key.weight)?;
                let v = product(x, &self.value.weight)?;
                let ctx = attention(&q, &k, &v, layout, heads, ap, drop)?;
                let attn_out = (&self.attn_out.weight, attn_out_bias);
                let x1 = self.attn_norm.forward_product_residual(&ctx, attn_out, x)?;
                let i = self.inter.forward_gelu(&x1, drop)?;
                let out = (&self.out.weight, &self.out.bias);
                self.out_norm.forward_product_residual(&i, out, &x1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn layer_norm_and_softmax_match_definitions() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2., 3., 6.]], &dev).unwrap();
        let ln = LayerNorm {
            weight: Tensor::ones(4, DType::F32, &dev).unwrap(),
            bias: Tensor::zeros(4, DType::F32, &dev).unwrap(),
            eps: 0.0,
        };
        let y: Vec<f32> = ln
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // mean 3, variance 3.5
        let s = 3.5f32.sqrt();
        for (a, b) in y.iter().zip([-2.0 / s, -1.0 / s, 0.0, 3.0 / s]) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        let p: Vec<f32> = super::super::fused::softmax_composed(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let z: f32 = [1f32, 2., 3., 6.].iter().map(|v| v.exp()).sum();
        assert!((p[3] - 6f32.exp() / z).abs() < 1e-6);
    }
}
