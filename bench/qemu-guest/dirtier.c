/*
 * dirtier: /init of the QEMU reference guest used by bench/peer-qemu.sh.
 *
 * Owns: the guest-side workload of the QEMU peer (fill a working set, then
 * dirty it at a paced rate). It mirrors fastmig's `fill` + `dirty` guest
 * workloads so QEMU and fastmig migrate comparable memory.
 * Does not own: anything about migration; it only prints to the console.
 *
 * Parameters come from the kernel command line. The kernel hands every
 * unrecognised `key=value` word to init's environment, so no /proc mount is
 * needed:
 *   fm_rate=PAGES_PER_S   pages dirtied per second (0 = idle; default 0)
 *   fm_wss=BYTES          working set that is dirtied (suffix K/M/G allowed;
 *                         default: free memory at start minus a reserve for
 *                         the kernel)
 *   fm_prefill=0|1        1 (default): first write a non-zero word into all
 *                         that free memory, not only the working set, like
 *                         fastmig's bench prefill; 0: touch only the working set
 *   fm_pattern=random|seq|hotcold  order of the dirtied pages (default random)
 *   fm_hot=F, fm_hotw=F   hotcold only: the first F of the pages are hot
 *                         (default 0.1) and take fm_hotw of the writes (0.9),
 *                         as in fastmig's `dirty` workload
 *   fm_report_ms=MS       period of the rate line on the console (default 1000)
 *
 * Console protocol (one line each, parsed by bench/qemu-guest/peer_run.py):
 *   FM wss_bytes=... pages=... fill_ms=...
 *   READY
 *   RATE t_ms=... pps=... total=...      (every fm_report_ms, forever)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
/* Ticks per second of the pacing loop: small batches keep the dirtying
 * spread over the second like fastmig's `dirty` workload, instead of one
 * burst per second. */
#define TICKS_PER_S 1000UL
/* Memory left to the kernel when fm_wss is not given: PID 1 must never be
 * OOM-killed (that panics the guest). */
#define RESERVE_MIN (24UL << 20)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t parse_size(const char *s, uint64_t dflt)
{
    if (s == NULL || *s == '\0')
        return dflt;
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s)
        return dflt;
    switch (*end) {
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    default: break;
    }
    return v;
}

/* A fraction in [0, 1]; anything else falls back to the default. */
static double parse_fraction(const char *s, double dflt)
{
    if (s == NULL || *s == '\0')
        return dflt;
    char *end = NULL;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || !(v >= 0.0 && v <= 1.0))
        return dflt;
    return v;
}

/* xorshift64*: cheap, good enough to spread writes over the working set. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static uint64_t next_random(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dULL;
}

static void sleep_until(uint64_t deadline_ns)
{
    struct timespec ts = {
        .tv_sec = (time_t)(deadline_ns / 1000000000ULL),
        .tv_nsec = (long)(deadline_ns % 1000000000ULL),
    };
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

int main(void)
{
    /* Console is line-buffered for the host-side parser. */
    setvbuf(stdout, NULL, _IOLBF, 0);

    struct sysinfo si;
    if (sysinfo(&si) != 0) {
        printf("FM error=sysinfo\n");
        for (;;)
            pause();
    }
    uint64_t freeb = (uint64_t)si.freeram * si.mem_unit;
    uint64_t totalb = (uint64_t)si.totalram * si.mem_unit;
    uint64_t reserve = totalb / 16 > RESERVE_MIN ? totalb / 16 : RESERVE_MIN;
    uint64_t dflt_wss = freeb > reserve ? freeb - reserve : 0;

    uint64_t wss = parse_size(getenv("fm_wss"), dflt_wss);
    uint64_t rate = parse_size(getenv("fm_rate"), 0);
    uint64_t report_ms = parse_size(getenv("fm_report_ms"), 1000);
    int prefill = parse_size(getenv("fm_prefill"), 1) != 0;
    const char *pattern = getenv("fm_pattern");
    int seq = pattern != NULL && strcmp(pattern, "seq") == 0;
    int hotcold = pattern != NULL && strcmp(pattern, "hotcold") == 0;
    double hot = parse_fraction(getenv("fm_hot"), 0.1);
    double hotw = parse_fraction(getenv("fm_hotw"), 0.9);
    if (report_ms == 0)
        report_ms = 1000;

    uint64_t pages = wss / PAGE;
    if (pages == 0) {
        printf("FM error=empty_wss free=%llu\n", (unsigned long long)freeb);
        for (;;)
            pause();
    }
    uint64_t hot_pages = (uint64_t)(hot * (double)pages);
    if (hot_pages == 0)
        hot_pages = 1;
    /* Integer threshold on a 32-bit draw: no floating point in the loop. */
    uint64_t hotw_threshold = (uint64_t)(hotw * 4294967296.0);
    /* The working set is the start of a mapping that may extend over all
     * free memory so the prefill covers it too. */
    uint64_t map_pages = pages;
    if (prefill && dflt_wss / PAGE > map_pages)
        map_pages = dflt_wss / PAGE;
    uint64_t *mem = mmap(NULL, map_pages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        printf("FM error=mmap wss=%llu\n", (unsigned long long)wss);
        for (;;)
            pause();
    }

    /* Touch every page with a non-zero word so QEMU sees no zero pages
     * ("all memory touched", like fastmig's `fill`). */
    uint64_t t0 = now_ns();
    const uint64_t words_per_page = PAGE / sizeof(uint64_t);
    for (uint64_t p = 0; p < map_pages; p++)
        mem[p * words_per_page] = p + 1;
    uint64_t fill_ms = (now_ns() - t0) / 1000000ULL;

    printf("FM total_bytes=%llu free_bytes=%llu filled_bytes=%llu wss_bytes=%llu pages=%llu "
           "fill_ms=%llu "
           "rate=%llu pattern=%s hot_pages=%llu\n",
           (unsigned long long)totalb, (unsigned long long)freeb,
           (unsigned long long)(map_pages * PAGE),
           (unsigned long long)(pages * PAGE), (unsigned long long)pages,
           (unsigned long long)fill_ms, (unsigned long long)rate,
           seq ? "seq" : hotcold ? "hotcold" : "random", (unsigned long long)hot_pages);
    printf("READY\n");

    uint64_t start = now_ns();
    uint64_t last_report = start;
    uint64_t total = 0, cursor = 0, stamp = 1, stamp_at_last = 1;
    uint64_t tick = 0;
    /* An idle guest (rate 0) wakes only to report: 1 kHz wake-ups would
     * cost real host CPU under TCG and blur the idle baseline. */
    const uint64_t tick_ns = rate > 0 ? 1000000000ULL / TICKS_PER_S : report_ms * 1000000ULL;
    for (;;) {
        if (rate > 0) {
            /* Pages due by the end of this tick minus pages written: keeps
             * the long-run rate exact even when rate/TICKS is fractional. */
            uint64_t due = (rate * (tick + 1)) / TICKS_PER_S;
            uint64_t batch = due - total;
            for (uint64_t i = 0; i < batch; i++) {
                uint64_t p;
                if (seq) {
                    p = cursor++ % pages;
                } else if (hotcold) {
                    uint64_t r = next_random();
                    int to_hot = (r >> 32) < hotw_threshold || hot_pages >= pages;
                    p = to_hot ? r % hot_pages : hot_pages + r % (pages - hot_pages);
                } else {
                    p = next_random() % pages;
                }
                /* A word that differs on every write: the page really changes. */
                mem[p * words_per_page + (stamp % words_per_page)] = stamp;
                stamp++;
            }
            total += batch;
        }
        tick++;
        uint64_t deadline = start + tick * tick_ns;
        uint64_t now = now_ns();
        if (now < deadline) {
            sleep_until(deadline);
        } else if (now - deadline > 1000000000ULL) {
            /* More than a second behind (guest starved of CPU, e.g. paused
             * for migration): restart the schedule instead of bursting. */
            uint64_t behind = (now - deadline) / tick_ns;
            tick += behind;
            total = (rate * tick) / TICKS_PER_S;
        }
        now = now_ns();
        if (now - last_report >= report_ms * 1000000ULL) {
            /* Writes actually done since the last line (not the schedule),
             * so a starved guest reports its real rate. */
            uint64_t written = stamp - stamp_at_last;
            uint64_t pps = written * 1000000000ULL / (now - last_report);
            printf("RATE t_ms=%llu pps=%llu total=%llu\n",
                   (unsigned long long)((now - start) / 1000000ULL),
                   (unsigned long long)pps, (unsigned long long)(stamp - 1));
            stamp_at_last = stamp;
            last_report = now;
        }
    }
    return 0;
}
