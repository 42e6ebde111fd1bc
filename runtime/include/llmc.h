/*
 * llmc.h: the C API of the llmc runtime (crate llmc-capi, library libllmc_capi.a).
 *
 * `llmc compile MODEL --emit lib -o DIR` writes DIR/libllmc_model.a (this runtime plus the compiled
 * model) and DIR/model.h (this header plus llmc_model_load_embedded). Link with
 *     cc app.c -I DIR -L DIR -lllmc_model -lpthread -ldl -lm
 *
 * Conventions: functions that can fail return an int status, LLMC_OK (0) on success or one of the
 * LLMC_ERR_* codes; llmc_last_error() then describes the failure (per thread, valid until the next
 * failing call on that thread). Results come back through out-pointers. Handles are freed with the
 * matching *_free function (NULL is accepted). A model may be shared by sessions on several
 * threads; a session or a sampler is used by one thread at a time. No call aborts the process:
 * a bug in llmc is reported as LLMC_ERR_INTERNAL.
 */
#ifndef LLMC_H
#define LLMC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. */
#define LLMC_OK 0
#define LLMC_ERR_IO 1               /* a file could not be read */
#define LLMC_ERR_CORRUPT 2          /* not an llmc artifact, or damaged (checksum, bounds) */
#define LLMC_ERR_UNSUPPORTED 3      /* other format version, target or a missing CPU feature */
#define LLMC_ERR_INVALID_ARGUMENT 4 /* NULL pointer, token id out of range, empty input, bad parameter */
#define LLMC_ERR_CONTEXT_OVERFLOW 5 /* the tokens do not fit the compiled context */
#define LLMC_ERR_TOKENIZER 6        /* no tokenizer in the artifact, or text it cannot handle */
#define LLMC_ERR_INTERNAL 7         /* a bug in llmc */

typedef struct llmc_model llmc_model;
typedef struct llmc_session llmc_session;
typedef struct llmc_sampler llmc_sampler;

/* Message of the last failed call on this thread ("" if none). Never NULL. */
const char *llmc_last_error(void);
/* The runtime's version, e.g. "0.1.0". */
const char *llmc_version(void);

/* ---- Models ---- */

/* Opens and verifies an artifact file (magic, version, checksums, bounds, target, CPU features). */
int llmc_model_load(const char *path, llmc_model **out);
/* Verifies and loads an artifact held in memory; the bytes are copied, so they may be freed after. */
int llmc_model_load_bytes(const void *bytes, size_t len, llmc_model **out);
void llmc_model_free(llmc_model *model);
size_t llmc_model_vocab_size(const llmc_model *model);
/* Most tokens (prompt plus generated) a session holds. */
size_t llmc_model_max_context(const llmc_model *model);
/* Writes up to `cap` end-of-sequence ids to `ids`; returns how many the model has. */
size_t llmc_model_eos_ids(const llmc_model *model, uint32_t *ids, size_t cap);

/* ---- Sessions: one conversation's KV cache ---- */

/* A session running each kernel on `threads` threads (0: all cores). */
int llmc_session_new(const llmc_model *model, size_t threads, llmc_session **out);
void llmc_session_free(llmc_session *session);
/* Forgets the conversation. */
void llmc_session_reset(llmc_session *session);
/* Tokens in the KV cache. */
size_t llmc_session_past(const llmc_session *session);
/* Appends `n` prompt tokens (any n >= 1; long prompts run in chunks). */
int llmc_session_prefill(llmc_session *session, const uint32_t *ids, size_t n);
/* Appends one token (a decode step). */
int llmc_session_decode(llmc_session *session, uint32_t id);
/* Logits (vocab_size floats) after the last prefill or decode step; NULL before the first.
 * Valid until the next call on this session. */
const float *llmc_session_logits(const llmc_session *session);

/* ---- Sampling ---- */

typedef struct llmc_sampling {
    float temperature;        /* 0: greedy (the most likely token) */
    uint32_t top_k;           /* keep the k most likely tokens; 0: all */
    float top_p;              /* keep the most likely tokens up to this total probability; 1: all */
    float repetition_penalty; /* > 1 discourages tokens already in the sequence; 1: off */
    uint64_t seed;            /* the same seed gives the same tokens (same as `llmc run --seed`) */
} llmc_sampling;

/* Greedy decoding: temperature 0, top_k 0, top_p 1, repetition_penalty 1, seed 0. */
llmc_sampling llmc_sampling_default(void);
int llmc_sampler_new(const llmc_sampling *params, llmc_sampler **out);
void llmc_sampler_free(llmc_sampler *sampler);
/* Records tokens already in the sequence (the prompt) for the repetition penalty. */
void llmc_sampler_accept(llmc_sampler *sampler, const uint32_t *ids, size_t n);
/* Picks a token from `vocab` logits and records it. */
int llmc_sampler_sample(llmc_sampler *sampler, const float *logits, size_t vocab, uint32_t *out);

/* ---- Text (when the artifact carries the checkpoint's tokenizer.json) ---- */

/* Token ids of `text` (NUL-terminated UTF-8). Writes min(cap, *n) ids to `ids` and the full count to
 * `*n`; call with cap 0 to ask for the size. */
int llmc_tokenize(const llmc_model *model, const char *text, uint32_t *ids, size_t cap, size_t *n);
/* UTF-8 text of `n` ids, special tokens left out. Writes at most cap-1 bytes and a NUL to `buf`, and
 * the full length (without the NUL) to `*len`; call with cap 0 to ask for the size. */
int llmc_detokenize(const llmc_model *model, const uint32_t *ids, size_t n, char *buf, size_t cap, size_t *len);

#ifdef __cplusplus
}
#endif

#endif /* LLMC_H */
