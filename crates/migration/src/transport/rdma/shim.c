/*
 * fastmig's thin C layer over rdma-core (libibverbs + librdmacm), for the `rdma` transport.
 *
 * Why C: the verbs data path (ibv_post_send, ibv_poll_cq, ibv_req_notify_cq...) is made of
 * `static inline` functions of <infiniband/verbs.h> that dispatch through the provider's
 * function table; they are not symbols of libibverbs.so. Compiling them here, against the
 * installed headers, means no struct layout of rdma-core is ever copied into Rust by hand:
 * Rust sees one opaque handle (`struct fm_link`), memory-region handles, scalars and the one
 * struct defined here (`struct fm_wc`).
 *
 * Every function returns 0 (or a count) on success and a negative errno on failure; none
 * keeps a pointer to caller memory beyond the call except what is registered (ibv_reg_mr),
 * which the Rust side deregisters before it frees or unmaps that memory.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

/* One completion, as Rust reads it (same layout as `verbs::Wc`). */
struct fm_wc {
    uint64_t wr_id;
    uint32_t status;
    uint32_t opcode;
    uint32_t byte_len;
    uint32_t vendor_err;
};

/*
 * What the links of one migration share: one protection domain (a memory key is valid on
 * every QP of its PD) and one completion queue with its completion channel (one poll, one
 * sleep, for every QP). Reference-counted by the links; the last one frees it.
 */
struct fm_shared {
    struct ibv_pd *pd;
    struct ibv_comp_channel *cc;
    struct ibv_cq *cq;
    int refs;
};

/* One rdma_cm connection (or listener) and its verbs resources. */
struct fm_link {
    struct rdma_event_channel *ch;
    struct rdma_cm_id *id;
    struct fm_shared *sh;
    int has_qp;
    int pending; /* a connect request neither accepted nor rejected yet */
    int connected;
    /* Private data of the peer's connect request (listener's accept only). */
    uint8_t peer_data[64];
    uint8_t peer_len;
};

static int neg_errno(int fallback)
{
    return errno ? -errno : -fallback;
}

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

int fm_device_count(void)
{
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list)
        return 0; /* no RDMA subsystem at all: same as no device */
    ibv_free_device_list(list);
    return n;
}

/* Waits up to `timeout_ms` for the next CM event on `ch`, which must be `want`. */
static int wait_event(struct rdma_event_channel *ch, enum rdma_cm_event_type want, int timeout_ms,
                      struct rdma_cm_event **out)
{
    struct pollfd p = {.fd = ch->fd, .events = POLLIN};
    int r = poll(&p, 1, timeout_ms);
    if (r == 0)
        return -ETIMEDOUT;
    if (r < 0)
        return neg_errno(EIO);
    struct rdma_cm_event *ev;
    if (rdma_get_cm_event(ch, &ev))
        return neg_errno(EIO);
    if (ev->event != want) {
        int e = ev->event == RDMA_CM_EVENT_REJECTED || ev->event == RDMA_CM_EVENT_UNREACHABLE
                    ? -ECONNREFUSED
                    : -EPROTO;
        rdma_ack_cm_event(ev);
        return e;
    }
    *out = ev;
    return 0;
}

static int wait_ack(struct rdma_event_channel *ch, enum rdma_cm_event_type want, int timeout_ms)
{
    struct rdma_cm_event *ev;
    int r = wait_event(ch, want, timeout_ms, &ev);
    if (r == 0)
        rdma_ack_cm_event(ev);
    return r;
}

static void put_shared(struct fm_shared *sh)
{
    if (!sh || __atomic_sub_fetch(&sh->refs, 1, __ATOMIC_ACQ_REL) > 0)
        return;
    if (sh->cq)
        ibv_destroy_cq(sh->cq);
    if (sh->cc)
        ibv_destroy_comp_channel(sh->cc);
    if (sh->pd)
        ibv_dealloc_pd(sh->pd);
    free(sh);
}

/*
 * The shared PD and CQ: those of `with` (which must be on the same device), or new ones
 * with a CQ of `cq_depth` entries (sends and receives of every QP that will share it).
 */
static int get_shared(struct fm_link *l, const struct fm_link *with, int cq_depth)
{
    if (with) {
        if (!with->sh || with->sh->pd->context != l->id->verbs)
            return -EXDEV; /* another device: keys would not be valid here */
        __atomic_add_fetch(&with->sh->refs, 1, __ATOMIC_ACQ_REL);
        l->sh = with->sh;
        return 0;
    }
    struct fm_shared *sh = calloc(1, sizeof *sh);
    if (!sh)
        return -ENOMEM;
    sh->refs = 1;
    l->sh = sh;
    sh->pd = ibv_alloc_pd(l->id->verbs);
    if (!sh->pd)
        return neg_errno(ENOMEM);
    sh->cc = ibv_create_comp_channel(l->id->verbs);
    if (!sh->cc)
        return neg_errno(ENOMEM);
    sh->cq = ibv_create_cq(l->id->verbs, cq_depth, NULL, sh->cc, 0);
    if (!sh->cq)
        return neg_errno(ENOMEM);
    return 0;
}

/* An RC QP on `id`, on the PD and CQ shared with `with` (or new ones). */
static int make_qp(struct fm_link *l, int sq_depth, int rq_depth, const struct fm_link *with,
                   int cq_depth)
{
    int r = get_shared(l, with, cq_depth);
    if (r)
        return r;
    struct ibv_qp_init_attr a;
    memset(&a, 0, sizeof a);
    a.send_cq = l->sh->cq;
    a.recv_cq = l->sh->cq;
    a.qp_type = IBV_QPT_RC;
    a.sq_sig_all = 0; /* completions only for the work requests we mark signalled */
    a.cap.max_send_wr = sq_depth;
    a.cap.max_recv_wr = rq_depth;
    a.cap.max_send_sge = 1;
    a.cap.max_recv_sge = 1;
    if (rdma_create_qp(l->id, l->sh->pd, &a))
        return neg_errno(ENOMEM);
    l->has_qp = 1;
    return 0;
}

/*
 * ACK timeout 4.096 us * 2^14 = 67 ms (rdma_cm's RoCE default is larger): with 7 retries a
 * vanished peer shows as RETRY_EXC_ERR within about half a second. Best effort.
 */
static void set_ack_timeout(struct rdma_cm_id *id)
{
    uint8_t t = 14;
    (void)rdma_set_option(id, RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &t, sizeof t);
}

static void conn_param(struct rdma_conn_param *p, const void *data, uint8_t len)
{
    memset(p, 0, sizeof *p);
    p->private_data = data;
    p->private_data_len = len;
    p->responder_resources = 1;
    p->initiator_depth = 1;
    p->retry_count = 7;
    p->rnr_retry_count = 7;
}

void fm_destroy(struct fm_link *l)
{
    if (!l)
        return;
    if (l->pending)
        rdma_reject(l->id, NULL, 0);
    if (l->connected)
        rdma_disconnect(l->id);
    if (l->has_qp)
        rdma_destroy_qp(l->id);
    /* Before the id: the id keeps the device (and so the PD's context) open. */
    put_shared(l->sh);
    if (l->id)
        rdma_destroy_id(l->id);
    if (l->ch)
        rdma_destroy_event_channel(l->ch);
    free(l);
}

static struct fm_link *new_link(int *err)
{
    struct fm_link *l = calloc(1, sizeof *l);
    if (!l) {
        *err = -ENOMEM;
        return NULL;
    }
    l->ch = rdma_create_event_channel();
    if (!l->ch || rdma_create_id(l->ch, &l->id, NULL, RDMA_PS_TCP)) {
        *err = neg_errno(ENODEV);
        fm_destroy(l);
        return NULL;
    }
    return l;
}

/*
 * Source: resolves `addr`, builds the QP (sharing the PD and CQ of `with` if not NULL, else
 * new ones with a CQ of `cq_depth`) and connects with `data` as private data.
 */
struct fm_link *fm_connect(const struct sockaddr *addr, int timeout_ms, const void *data,
                           uint8_t len, int sq_depth, int rq_depth, const struct fm_link *with,
                           int cq_depth, int *err)
{
    struct fm_link *l = new_link(err);
    if (!l)
        return NULL;
    long deadline = now_ms() + timeout_ms;
    int r;
#define LEFT() ((int)(deadline - now_ms() > 0 ? deadline - now_ms() : 0))
    if (rdma_resolve_addr(l->id, NULL, (struct sockaddr *)addr, timeout_ms)) {
        r = neg_errno(EHOSTUNREACH);
        goto fail;
    }
    if ((r = wait_ack(l->ch, RDMA_CM_EVENT_ADDR_RESOLVED, LEFT())))
        goto fail;
    if (rdma_resolve_route(l->id, timeout_ms)) {
        r = neg_errno(EHOSTUNREACH);
        goto fail;
    }
    if ((r = wait_ack(l->ch, RDMA_CM_EVENT_ROUTE_RESOLVED, LEFT())))
        goto fail;
    set_ack_timeout(l->id);
    if ((r = make_qp(l, sq_depth, rq_depth, with, cq_depth)))
        goto fail;
    struct rdma_conn_param p;
    conn_param(&p, data, len);
    if (rdma_connect(l->id, &p)) {
        r = neg_errno(ECONNREFUSED);
        goto fail;
    }
    if ((r = wait_ack(l->ch, RDMA_CM_EVENT_ESTABLISHED, LEFT())))
        goto fail;
    l->connected = 1;
    return l;
#undef LEFT
fail:
    *err = r;
    fm_destroy(l);
    return NULL;
}

/* Destination: binds `addr` and listens (the connections of one migration). */
struct fm_link *fm_listen(const struct sockaddr *addr, int *err)
{
    struct fm_link *l = new_link(err);
    if (!l)
        return NULL;
    if (rdma_bind_addr(l->id, (struct sockaddr *)addr) || rdma_listen(l->id, 16)) {
        *err = neg_errno(EADDRINUSE);
        fm_destroy(l);
        return NULL;
    }
    return l;
}

/*
 * Destination, step 1: waits for a connect request on listener `ls` and builds a QP on its
 * id, without accepting yet: the caller checks the request's private data (`fm_peer_data`)
 * and posts its receives first. Destroying the link before `fm_accept_request` rejects the
 * request. The QP shares the PD and CQ of `with` if not NULL (else new ones, `cq_depth`).
 */
struct fm_link *fm_get_request(struct fm_link *ls, int timeout_ms, int sq_depth, int rq_depth,
                               const struct fm_link *with, int cq_depth, int *err)
{
    struct rdma_cm_event *ev;
    int r = wait_event(ls->ch, RDMA_CM_EVENT_CONNECT_REQUEST, timeout_ms, &ev);
    if (r) {
        *err = r;
        return NULL;
    }
    struct fm_link *l = calloc(1, sizeof *l);
    if (!l) {
        rdma_reject(ev->id, NULL, 0);
        rdma_destroy_id(ev->id);
        rdma_ack_cm_event(ev);
        *err = -ENOMEM;
        return NULL;
    }
    l->id = ev->id;
    l->pending = 1;
    int n = ev->param.conn.private_data_len;
    if (n > (int)sizeof l->peer_data)
        n = (int)sizeof l->peer_data;
    if (ev->param.conn.private_data)
        memcpy(l->peer_data, ev->param.conn.private_data, n);
    l->peer_len = (uint8_t)n;
    rdma_ack_cm_event(ev);
    /* The new id's events go to a channel of its own, so the link owns everything it uses. */
    l->ch = rdma_create_event_channel();
    if (!l->ch || rdma_migrate_id(l->id, l->ch)) {
        r = neg_errno(ENOMEM);
        goto fail;
    }
    set_ack_timeout(l->id);
    if ((r = make_qp(l, sq_depth, rq_depth, with, cq_depth)))
        goto fail;
    return l;
fail:
    *err = r;
    fm_destroy(l);
    return NULL;
}

/* Destination, step 2: accepts the request and waits until the connection is established. */
int fm_accept_request(struct fm_link *l, int timeout_ms)
{
    struct rdma_conn_param p;
    conn_param(&p, NULL, 0);
    l->pending = 0;
    if (rdma_accept(l->id, &p))
        return neg_errno(ECONNREFUSED);
    int r = wait_ack(l->ch, RDMA_CM_EVENT_ESTABLISHED, timeout_ms);
    if (r == 0)
        l->connected = 1;
    return r;
}

int fm_peer_data(const struct fm_link *l, uint8_t *out, int cap)
{
    int n = l->peer_len < cap ? l->peer_len : cap;
    memcpy(out, l->peer_data, n);
    return n;
}

struct ibv_mr *fm_reg_mr(struct fm_link *l, void *addr, size_t len, int remote_write, int *err)
{
    int access = remote_write ? IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE : 0;
    struct ibv_mr *mr = ibv_reg_mr(l->sh->pd, addr, len, access);
    if (!mr)
        *err = neg_errno(ENOMEM);
    return mr;
}

uint32_t fm_mr_lkey(const struct ibv_mr *mr) { return mr->lkey; }
uint32_t fm_mr_rkey(const struct ibv_mr *mr) { return mr->rkey; }

int fm_dereg_mr(struct ibv_mr *mr)
{
    return ibv_dereg_mr(mr) ? neg_errno(EBUSY) : 0;
}

/* Posts one send-queue request of one local buffer: a WRITE to (raddr, rkey), or a SEND. */
static int post_one(struct fm_link *l, enum ibv_wr_opcode opcode, uint64_t laddr, uint32_t len,
                    uint32_t lkey, uint64_t raddr, uint32_t rkey, uint64_t wr_id, int signaled)
{
    struct ibv_sge sge = {.addr = laddr, .length = len, .lkey = lkey};
    struct ibv_send_wr wr, *bad;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.send_flags = signaled ? IBV_SEND_SIGNALED : 0;
    if (opcode == IBV_WR_RDMA_WRITE) {
        wr.wr.rdma.remote_addr = raddr;
        wr.wr.rdma.rkey = rkey;
    }
    int r = ibv_post_send(l->id->qp, &wr, &bad);
    return r ? -r : 0;
}

int fm_post_write(struct fm_link *l, uint64_t laddr, uint32_t len, uint32_t lkey, uint64_t raddr,
                  uint32_t rkey, uint64_t wr_id, int signaled)
{
    return post_one(l, IBV_WR_RDMA_WRITE, laddr, len, lkey, raddr, rkey, wr_id, signaled);
}

int fm_post_send(struct fm_link *l, uint64_t laddr, uint32_t len, uint32_t lkey, uint64_t wr_id)
{
    return post_one(l, IBV_WR_SEND, laddr, len, lkey, 0, 0, wr_id, 1);
}

int fm_post_recv(struct fm_link *l, uint64_t laddr, uint32_t len, uint32_t lkey, uint64_t wr_id)
{
    struct ibv_sge sge = {.addr = laddr, .length = len, .lkey = lkey};
    struct ibv_recv_wr wr, *bad;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    int r = ibv_post_recv(l->id->qp, &wr, &bad);
    return r ? -r : 0;
}

static int poll_some(struct fm_link *l, struct fm_wc *out, int max)
{
    struct ibv_wc wc[32];
    if (max > 32)
        max = 32;
    int n = ibv_poll_cq(l->sh->cq, max, wc);
    if (n < 0)
        return -EIO;
    for (int i = 0; i < n; i++) {
        out[i].wr_id = wc[i].wr_id;
        out[i].status = wc[i].status;
        out[i].opcode = wc[i].opcode;
        out[i].byte_len = wc[i].byte_len;
        out[i].vendor_err = wc[i].vendor_err;
    }
    return n;
}

/*
 * Up to `max` completions; when none is ready, sleeps on the completion channel (no busy
 * polling: the CPU stays with the guest) for at most `timeout_ms`. Returns the count, 0 on
 * timeout.
 */
int fm_poll_wait(struct fm_link *l, struct fm_wc *out, int max, int timeout_ms)
{
    int n = poll_some(l, out, max);
    if (n != 0)
        return n;
    if (ibv_req_notify_cq(l->sh->cq, 0))
        return -EIO;
    /* A completion that arrived before the notification was armed raises no event. */
    n = poll_some(l, out, max);
    if (n != 0)
        return n;
    struct pollfd p = {.fd = l->sh->cc->fd, .events = POLLIN};
    int r = poll(&p, 1, timeout_ms);
    if (r < 0)
        return errno == EINTR ? 0 : -errno;
    if (r == 0)
        return 0;
    struct ibv_cq *cq;
    void *ctx;
    if (ibv_get_cq_event(l->sh->cc, &cq, &ctx))
        return -EIO;
    ibv_ack_cq_events(cq, 1);
    return poll_some(l, out, max);
}

/* Moves the QP to the error state (fault injection in the lab; also a way to stop traffic). */
int fm_qp_to_error(struct fm_link *l)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_ERR;
    int r = ibv_modify_qp(l->id->qp, &a, IBV_QP_STATE);
    return r ? -r : 0;
}

const char *fm_wc_status_str(uint32_t status)
{
    return ibv_wc_status_str((enum ibv_wc_status)status);
}
