// Python bindings of convoy's CPU kernels (one extension module, built by cpu_kernels.py).

#include <torch/extension.h>

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor block_tables,
                            torch::Tensor context_lens, int64_t block_size, double scale,
                            int64_t window);
void paged_prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                             torch::Tensor v_cache, torch::Tensor block_tables,
                             torch::Tensor query_starts, torch::Tensor positions,
                             torch::Tensor num_queries, int64_t block_size, double scale,
                             int64_t window);
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slot_mapping);
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor skinny_linear_ordered(torch::Tensor x, torch::Tensor w,
                                    c10::optional<torch::Tensor> bias, int64_t k_block);
torch::Tensor ordered_weight_blocks(torch::Tensor w);
torch::Tensor skinny_linear_ordered_blocks(torch::Tensor x, torch::Tensor w_blocks,
                                           c10::optional<torch::Tensor> bias, int64_t k_block,
                                           int64_t out_features);
torch::Tensor skinny_linear_int8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                                 c10::optional<torch::Tensor> bias);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                        double eps);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
void rotary_embedding(torch::Tensor positions, torch::Tensor q, torch::Tensor k, torch::Tensor cos,
                      torch::Tensor sin);
torch::Tensor argmax_rows(torch::Tensor x);
torch::Tensor screened_argmax(torch::Tensor approx, torch::Tensor x, torch::Tensor weight,
                              torch::Tensor row_bound, int64_t max_candidates);
std::tuple<torch::Tensor, torch::Tensor> quantize_rows_int8(torch::Tensor x);
torch::Tensor screened_argmax_int8(torch::Tensor acc, torch::Tensor x, torch::Tensor weight,
                                   torch::Tensor w_scale, torch::Tensor u, torch::Tensor v,
                                   torch::Tensor rows, int64_t max_candidates);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Decode attention over a paged float32 KV cache (CPU)");
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "Causal attention of prompt chunks over a paged float32 KV cache (CPU)");
  m.def("write_kv", &write_kv,
        "Store new tokens' keys and values at their slots of the paged cache (CPU)");
  m.def("skinny_linear", &skinny_linear, "x W^T + b for a few rows of x, float32 (CPU)");
  m.def("skinny_linear_ordered", &skinny_linear_ordered,
        "x W^T + b in oneDNN's order: an FMA chain over k per block of k_block inputs, the "
        "blocks' sums in order, then b; float32 (CPU)",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("k_block"));
  m.def("ordered_weight_blocks", &ordered_weight_blocks,
        "W (N, K) as skinny_linear_ordered_blocks reads it: (ceil(N / L), K, L), zero-padded");
  m.def("skinny_linear_ordered_blocks", &skinny_linear_ordered_blocks,
        "skinny_linear_ordered, bitwise, on W in ordered_weight_blocks' layout (CPU)",
        py::arg("x"), py::arg("w_blocks"), py::arg("bias"), py::arg("k_block"),
        py::arg("out_features"));
  m.def("skinny_linear_int8", &skinny_linear_int8,
        "x (Wq * scale)^T + b for a few rows of x, int8 weights with per-row scales (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, float32 (CPU)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm,
        "In place: residual += x, x = RMSNorm(residual), float32 (CPU)");
  m.def("silu_and_mul", &silu_and_mul, "(N, 2I) gate|up -> silu(gate) * up, float32 (CPU)");
  m.def("rotary_embedding", &rotary_embedding,
        "Rotary embedding of q and k in place at the given positions, float32 (CPU)");
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, dim=-1) for float32 rows (CPU)");
  m.def("screened_argmax", &screened_argmax,
        "argmax of x W^T per row from its bfloat16 screen, -1 where it cannot settle it (CPU)");
  m.def("quantize_rows_int8", &quantize_rows_int8,
        "Rows of x as int8 with per-row scales, and the int8 screen's bound terms (CPU)");
  m.def("screened_argmax_int8", &screened_argmax_int8,
        "argmax of x W^T per row from its int8 screen, -1 where it cannot settle it (CPU)");
}
