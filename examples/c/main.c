/*
 * examples/c/main.c: generate text with a model linked into the program.
 *
 *   llmc compile models/seedlm --emit lib -o build/seedlm
 *   cc examples/c/main.c -I build/seedlm -L build/seedlm -lllmc_model -lpthread -ldl -lm -o generate
 *   ./generate "Speculative decoding"
 *
 * Options: --file ARTIFACT (load a .llmc file instead of the linked model), --ids 1,2,3 (token ids
 * instead of text), --max-new N, --temperature T, --top-k K, --top-p P, --repetition-penalty R,
 * --seed S, --threads N. Prints the generated ids on the first line, comma-separated, and their
 * text on the second when the model carries a tokenizer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static int fail(const char *what, int code) {
    fprintf(stderr, "error: %s: %s (code %d)\n", what, llmc_last_error(), code);
    return 1;
}

/* Parses "1,2,3" into a new array; returns the count, 0 on a bad list. */
static size_t parse_ids(const char *s, uint32_t **out) {
    size_t cap = 1;
    for (const char *p = s; *p; p++) cap += *p == ',';
    uint32_t *ids = malloc(cap * sizeof *ids);
    size_t n = 0;
    char *end;
    while (*s) {
        unsigned long v = strtoul(s, &end, 10);
        if (end == s) { free(ids); return 0; }
        ids[n++] = (uint32_t)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') { free(ids); return 0; }
    }
    *out = ids;
    return n;
}

int main(int argc, char **argv) {
    const char *file = NULL, *ids_arg = NULL, *prompt = NULL;
    size_t max_new = 32, threads = 1;
    llmc_sampling sampling = llmc_sampling_default();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--file") && v) { file = v; i++; }
        else if (!strcmp(a, "--ids") && v) { ids_arg = v; i++; }
        else if (!strcmp(a, "--max-new") && v) { max_new = strtoul(v, NULL, 10); i++; }
        else if (!strcmp(a, "--temperature") && v) { sampling.temperature = strtof(v, NULL); i++; }
        else if (!strcmp(a, "--top-k") && v) { sampling.top_k = strtoul(v, NULL, 10); i++; }
        else if (!strcmp(a, "--top-p") && v) { sampling.top_p = strtof(v, NULL); i++; }
        else if (!strcmp(a, "--repetition-penalty") && v) { sampling.repetition_penalty = strtof(v, NULL); i++; }
        else if (!strcmp(a, "--seed") && v) { sampling.seed = strtoull(v, NULL, 10); i++; }
        else if (!strcmp(a, "--threads") && v) { threads = strtoul(v, NULL, 10); i++; }
        else if (a[0] != '-' && !prompt) { prompt = a; }
        else { fprintf(stderr, "usage: %s [--file ARTIFACT] [--ids IDS | PROMPT] [--max-new N] [sampling options]\n", argv[0]); return 2; }
    }
    if (!prompt && !ids_arg) { fprintf(stderr, "give a PROMPT or --ids\n"); return 2; }

    llmc_model *model = NULL;
    int rc = file ? llmc_model_load(file, &model) : llmc_model_load_embedded(&model);
    if (rc != LLMC_OK) return fail("loading the model", rc);

    /* The prompt's token ids. */
    uint32_t *ids = NULL;
    size_t n = 0;
    if (ids_arg) {
        n = parse_ids(ids_arg, &ids);
        if (n == 0) { fprintf(stderr, "--ids: not a comma-separated id list: %s\n", ids_arg); return 2; }
    } else {
        rc = llmc_tokenize(model, prompt, NULL, 0, &n); /* ask for the size */
        if (rc != LLMC_OK) return fail("tokenizing", rc);
        ids = malloc((n ? n : 1) * sizeof *ids);
        rc = llmc_tokenize(model, prompt, ids, n, &n);
        if (rc != LLMC_OK) return fail("tokenizing", rc);
    }

    llmc_session *session = NULL;
    llmc_sampler *sampler = NULL;
    if ((rc = llmc_session_new(model, threads, &session)) != LLMC_OK) return fail("creating a session", rc);
    if ((rc = llmc_sampler_new(&sampling, &sampler)) != LLMC_OK) return fail("creating the sampler", rc);
    llmc_sampler_accept(sampler, ids, n);
    uint32_t eos[16];
    size_t neos = llmc_model_eos_ids(model, eos, 16);
    if (neos > 16) neos = 16;
    size_t vocab = llmc_model_vocab_size(model);

    /* Prefill, then one decode step per token until max_new or an end-of-sequence token. */
    if ((rc = llmc_session_prefill(session, ids, n)) != LLMC_OK) return fail("prefill", rc);
    uint32_t *out = malloc((max_new ? max_new : 1) * sizeof *out);
    size_t nout = 0;
    while (nout < max_new) {
        uint32_t t;
        if ((rc = llmc_sampler_sample(sampler, llmc_session_logits(session), vocab, &t)) != LLMC_OK) return fail("sampling", rc);
        out[nout++] = t;
        int stop = 0;
        for (size_t i = 0; i < neos; i++) stop |= t == eos[i];
        if (stop || nout == max_new) break;
        if ((rc = llmc_session_decode(session, t)) != LLMC_OK) return fail("decode", rc);
    }

    for (size_t i = 0; i < nout; i++) printf("%s%u", i ? "," : "", out[i]);
    printf("\n");
    size_t len = 0;
    if (llmc_detokenize(model, out, nout, NULL, 0, &len) == LLMC_OK) {
        char *text = malloc(len + 1);
        llmc_detokenize(model, out, nout, text, len + 1, &len);
        printf("%s\n", text);
        free(text);
    }

    free(out);
    free(ids);
    llmc_sampler_free(sampler);
    llmc_session_free(session);
    llmc_model_free(model);
    return 0;
}
