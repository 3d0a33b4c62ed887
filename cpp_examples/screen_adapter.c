/* The smallest complete C program: screen one PEFT adapter directory against a base model,
 * print the verdict and the JSON report.  Usage: screen_adapter BASE ADAPTER_DIR
 * Exit 0 on success, 1 on any error (with the library's message on stderr). */
#include <stdio.h>
#include <stdlib.h>

#include "intruder_gate.h"

static int fail(const char *what, ig_status status) {
  char msg[512];
  ig_last_error(msg, sizeof msg);
  fprintf(stderr, "error: %s: %s: %s\n", what, ig_status_str(status), msg);
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s BASE ADAPTER_DIR\n", argv[0]);
    return 2;
  }
  ig_gate *gate = NULL;
  ig_report *report = NULL;
  char *json = NULL;
  int rc = 0;
  ig_status s;

  if ((s = ig_gate_new(NULL, &gate)) != IG_STATUS_OK) {
    rc = fail("creating the gate", s);
  } else if ((s = ig_gate_attach_base(gate, argv[1])) != IG_STATUS_OK) {
    rc = fail("attaching the base", s);
  } else if ((s = ig_gate_screen_adapter(gate, argv[2], &report)) != IG_STATUS_OK) {
    rc = fail("screening the adapter", s);
  } else {
    size_t needed = 0;
    ig_report_json(report, NULL, 0, &needed); /* asks for the size */
    json = malloc(needed);
    if (json == NULL || (s = ig_report_json(report, json, needed, &needed)) != IG_STATUS_OK) {
      rc = json ? fail("writing the JSON report", s) : (perror("malloc"), 1);
    } else {
      const ig_verdict v = ig_report_verdict(report);
      printf("verdict: %s\n", v == IG_VERDICT_ACCEPT ? "accept"
                              : v == IG_VERDICT_WARN ? "warn"
                              : v == IG_VERDICT_CLAMP ? "clamp" : "reject");
      printf("intruders: %u in %zu modules\n", ig_report_total_intruders(report),
             ig_report_module_count(report));
      printf("%s\n", json);
    }
  }
  free(json);
  ig_report_free(report);
  ig_gate_free(gate);
  return rc;
}
