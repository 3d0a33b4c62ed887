/* Soak test of one long-lived gate: THREADS pthreads screen ADAPTERS synthetic in-memory
 * adapters (ig_adapter_add_module + ig_gate_screen) on one gate, mixed: clean ones, ones with
 * planted intruders that are then clamped (ig_gate_clamp), and bad ones (a NaN factor, a shape
 * that does not fit the base, a module no base tensor matches), each named uniquely so the
 * per-adapter metric sees 10,000 names. Every SAMPLE adapters it prints RSS, open descriptors,
 * threads and the metrics text's size and series count; exits 1 when, after the warm-up
 * sample, RSS grows by more than RSS_SLACK_MIB, descriptors or threads change, or the metrics
 * gain a series (or grow by more than 10 % in size); 2 on an unexpected status.
 *
 * Usage: soak [ADAPTERS=10000] [THREADS=4] [DIM=384] [SAMPLE=500] [WARMUP=1000]
 *             [RSS_SLACK_MIB=24]
 * Built and run by scripts/soak.sh. */
#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "intruder_gate.h"

static long n_adapters = 10000, n_threads = 4, dim = 384, sample_every = 500, warmup = 1000;
static double rss_slack_mib = 24;

static const char *names[4] = {
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
};
static size_t rows[4], cols[4];
static float *base[4];

static ig_gate *gate;
static atomic_long next_adapter, done;
static atomic_long n_ok, n_clamped, n_intruders, n_expected_fail;
static atomic_int failed;

/* xorshift64*: deterministic per adapter, so a run is reproducible. */
static double uniform(uint64_t *s) {
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return (double)((*s * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}
static double normal(uint64_t *s) {
  double u = uniform(s) + 1e-300, v = uniform(s);
  return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}
static void fill(float *x, size_t n, double scale, uint64_t *s) {
  for (size_t i = 0; i < n; i++) x[i] = (float)(scale * normal(s));
}

static void die(const char *what, long i, ig_status st) {
  char msg[512];
  ig_last_error(msg, sizeof msg);
  fprintf(stderr, "adapter %ld: %s: %s: %s\n", i, what, ig_status_str(st), msg);
  atomic_store(&failed, 1);
}

/* Kinds by i % 10: 0-5 clean, 6-7 planted intruders then clamped, 8 NaN in B (refused by
 * ig_adapter_add_module), 9 alternately a shape that does not fit the base or a module no base
 * tensor matches (refused by ig_gate_screen). */
static void screen_one(long i) {
  uint64_t seed = 0x9e3779b97f4a7c15ULL ^ (uint64_t)(i + 1) * 0xbf58476d1ce4e5b9ULL;
  const int kind = (int)(i % 10);
  const size_t rank = 4 + (size_t)(i % 3) * 4;
  ig_adapter *a = ig_adapter_new();
  char name[32];
  snprintf(name, sizeof name, "soak-%ld", i);
  ig_adapter_set_name(a, name);
  int expect_fail = 0;
  for (int m = 0; m < 4; m++) {
    size_t in = cols[m], out = rows[m];
    const char *target = names[m];
    if (kind == 9 && m == 1) {
      if ((i / 10) % 2) in += 3; /* wrong shape */
      else target = "model.layers.7.mlp.gate_proj.weight"; /* no such base tensor */
      expect_fail = 1;
    }
    float *fa = malloc(rank * in * sizeof *fa), *fb = malloc(out * rank * sizeof *fb);
    fill(fa, rank * in, 1 / sqrt((double)in), &seed);
    fill(fb, out * rank, kind >= 6 && kind <= 7 ? 3.0 : 0.002, &seed);
    if (kind == 8 && m == 2) fb[out * rank / 2] = NAN;
    ig_status st = ig_adapter_add_module(a, target, fa, fb, IG_DTYPE_F32, rank, in, out, 2.0f);
    free(fa);
    free(fb);
    if (kind == 8 && m == 2) {
      if (st != IG_STATUS_NON_FINITE) die("NaN factor not refused", i, st);
      atomic_fetch_add(&n_expected_fail, 1);
      ig_adapter_free(a);
      return;
    }
    if (st != IG_STATUS_OK) {
      die("ig_adapter_add_module", i, st);
      ig_adapter_free(a);
      return;
    }
  }
  ig_report *r = NULL;
  ig_status st = ig_gate_screen(gate, a, &r);
  if (expect_fail) {
    if (st != IG_STATUS_SHAPE && st != IG_STATUS_BASE_MISMATCH) die("bad adapter not refused", i, st);
    atomic_fetch_add(&n_expected_fail, 1);
  } else if (st != IG_STATUS_OK) {
    die("ig_gate_screen", i, st);
  } else {
    atomic_fetch_add(&n_ok, 1);
    atomic_fetch_add(&n_intruders, ig_report_total_intruders(r));
    if (kind >= 6 && kind <= 7) {
      ig_adapter *c = NULL;
      st = ig_gate_clamp(gate, r, 0.5, IG_CLAMP_TARGET_ALL,
                         kind == 6 ? IG_CLAMP_MODE_EXACT : IG_CLAMP_MODE_RANK_PRESERVING, 0, &c);
      if (st != IG_STATUS_OK) die("ig_gate_clamp", i, st);
      else atomic_fetch_add(&n_clamped, 1);
      ig_adapter_free(c);
    }
  }
  ig_report_free(r);
  ig_adapter_free(a);
}

static void *worker(void *arg) {
  (void)arg;
  for (;;) {
    long i = atomic_fetch_add(&next_adapter, 1);
    if (i >= n_adapters || atomic_load(&failed)) break;
    screen_one(i);
    atomic_fetch_add(&done, 1);
  }
  return NULL;
}

typedef struct {
  long adapters;
  double seconds, rss_mib;
  long fds, threads, metrics_bytes, series;
} sample;

static long status_field(const char *field) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long v = -1;
  size_t n = strlen(field);
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, field, n) == 0) v = atol(line + n);
  if (f) fclose(f);
  return v;
}

static long count_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  long n = 0;
  for (struct dirent *e; d && (e = readdir(d));)
    if (e->d_name[0] != '.') n++;
  if (d) closedir(d);
  return n - 1; /* the directory stream itself */
}

static void take(sample *s, long adapters, double seconds) {
  s->adapters = adapters;
  s->seconds = seconds;
  s->rss_mib = status_field("VmRSS:") / 1024.0;
  s->threads = status_field("Threads:");
  s->fds = count_fds();
  size_t need = 0;
  ig_gate_metrics(gate, NULL, 0, &need);
  char *text = NULL;
  ig_status st;
  do { /* other threads may grow the text between the calls */
    text = realloc(text, need + 4096);
    size_t cap = need + 4096;
    st = ig_gate_metrics(gate, text, cap, &need);
  } while (st == IG_STATUS_BUFFER_TOO_SMALL);
  s->metrics_bytes = (long)strlen(text);
  s->series = 0;
  for (char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
    if (*line != '#' && *line != '\n') s->series++;
  free(text);
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  long *params[] = {&n_adapters, &n_threads, &dim, &sample_every, &warmup};
  for (int i = 1; i < argc && i <= 5; i++) *params[i - 1] = atol(argv[i]);
  if (argc > 6) rss_slack_mib = atof(argv[6]);

  size_t shapes[4][2] = {{dim, dim}, {dim, dim}, {2 * dim, dim}, {dim, 2 * dim}};
  uint64_t seed = 42;
  for (int m = 0; m < 4; m++) {
    rows[m] = shapes[m][0];
    cols[m] = shapes[m][1];
    base[m] = malloc(rows[m] * cols[m] * sizeof(float));
    fill(base[m], rows[m] * cols[m], 1 / sqrt((double)cols[m]), &seed);
  }
  ig_config *c = ig_config_new();
  ig_config_set_cache_dir(c, NULL); /* memory cache only: nothing on disk */
  ig_status st = ig_gate_new(c, &gate);
  ig_config_free(c);
  if (st != IG_STATUS_OK) return die("ig_gate_new", -1, st), 2;
  for (int m = 0; m < 4; m++)
    if ((st = ig_gate_attach_base_tensor(gate, names[m], base[m], IG_DTYPE_F32, rows[m], cols[m])))
      return die("ig_gate_attach_base_tensor", -1, st), 2;

  printf("soak: %ld adapters, %ld threads, base %ldx%ld (4 tensors), sample every %ld, warm-up %ld\n",
         n_adapters, n_threads, dim, dim, sample_every, warmup);
  printf("%9s %8s %9s %5s %8s %10s %7s\n", "adapters", "seconds", "rss_MiB", "fds", "threads",
         "metrics_B", "series");
  const double t0 = now();
  sample first, warm = {0}, last;
  take(&first, 0, 0);
  printf("%9ld %8.1f %9.1f %5ld %8ld %10ld %7ld\n", first.adapters, first.seconds, first.rss_mib,
         first.fds, first.threads, first.metrics_bytes, first.series);
  pthread_t *tid = calloc((size_t)n_threads, sizeof *tid);
  for (long t = 0; t < n_threads; t++) pthread_create(&tid[t], NULL, worker, NULL);
  long next_sample = sample_every;
  int have_warm = 0;
  double rss_max = 0;
  for (;;) {
    long d = atomic_load(&done);
    int finished = d >= n_adapters || atomic_load(&failed);
    if (d >= next_sample || finished) {
      take(&last, d, now() - t0);
      printf("%9ld %8.1f %9.1f %5ld %8ld %10ld %7ld\n", last.adapters, last.seconds, last.rss_mib,
             last.fds, last.threads, last.metrics_bytes, last.series);
      fflush(stdout);
      if (!have_warm && d >= warmup) warm = last, have_warm = 1;
      if (have_warm && last.rss_mib > rss_max) rss_max = last.rss_mib;
      while (next_sample <= d) next_sample += sample_every;
    }
    if (finished) break;
    usleep(20000);
  }
  for (long t = 0; t < n_threads; t++) pthread_join(tid[t], NULL);
  free(tid);
  take(&last, atomic_load(&done), now() - t0);

  printf("screened %ld, clamped %ld, refused as expected %ld, intruders %ld, %.1f adapters/s\n",
         atomic_load(&n_ok), atomic_load(&n_clamped), atomic_load(&n_expected_fail),
         atomic_load(&n_intruders), last.adapters / last.seconds);
  int rc = atomic_load(&failed) ? 2 : 0;
  if (!have_warm) {
    fprintf(stderr, "FAIL: never reached the warm-up (%ld adapters)\n", warmup);
    rc = rc ? rc : 1;
  } else {
    printf("after warm-up (%ld adapters): RSS %.1f -> %.1f MiB (max %.1f, bound +%.0f), fds %ld -> %ld, "
           "threads %ld -> %ld (+%ld workers joined), series %ld -> %ld, metrics %ld -> %ld bytes\n",
           warm.adapters, warm.rss_mib, last.rss_mib, rss_max, rss_slack_mib, warm.fds, last.fds,
           warm.threads, last.threads, n_threads, warm.series, last.series, warm.metrics_bytes,
           last.metrics_bytes);
    if (rss_max > warm.rss_mib + rss_slack_mib) fprintf(stderr, "FAIL: RSS grew\n"), rc = rc ? rc : 1;
    if (last.fds != warm.fds) fprintf(stderr, "FAIL: descriptors changed\n"), rc = rc ? rc : 1;
    /* The last sample is taken after the workers are joined: the library's own threads only. */
    if (last.threads != warm.threads - n_threads)
      fprintf(stderr, "FAIL: threads changed\n"), rc = rc ? rc : 1;
    if (last.series != warm.series) fprintf(stderr, "FAIL: metrics gained series\n"), rc = rc ? rc : 1;
    if (last.metrics_bytes > warm.metrics_bytes + warm.metrics_bytes / 10)
      fprintf(stderr, "FAIL: metrics text grew\n"), rc = rc ? rc : 1;
  }
  if (last.adapters != n_adapters && !atomic_load(&failed)) rc = rc ? rc : 1;
  ig_gate_free(gate);
  for (int m = 0; m < 4; m++) free(base[m]);
  printf("%s\n", rc ? "soak: FAILED" : "soak: ok");
  return rc;
}
