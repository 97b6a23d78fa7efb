/* Canopy's PMIx shim: the six PMIx client calls a broker needs, with plain
 * C types at the boundary so that the Rust side declares no PMIx struct.
 * Built only when libpmix's headers are found (see build.rs).
 *
 * libpmix is loaded with dlopen at the first canopy_pmix_init, not linked:
 * it pulls in libevent, hwloc and libmunge, which every canopy process
 * would otherwise load at exec (about 0.7 ms each), PMIx launch or not. */
#include <pmix.h>
#include <dlfcn.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* Every PMIx function this file calls, the header's macros included
 * (PMIX_INFO_LOAD, PMIX_VALUE_RELEASE), goes through a pointer. */
#define CANOPY_PMIX_FUNCS(X)                                                   \
    X(PMIx_Init)                                                               \
    X(PMIx_Get)                                                                \
    X(PMIx_Put)                                                                \
    X(PMIx_Commit)                                                             \
    X(PMIx_Fence)                                                              \
    X(PMIx_Finalize)                                                           \
    X(PMIx_Abort)                                                              \
    X(PMIx_Error_string)                                                       \
    X(PMIx_Info_load)                                                          \
    X(PMIx_Value_destruct)

#define DECLARE(f) static __typeof__(f) *p_##f;
CANOPY_PMIX_FUNCS(DECLARE)
#undef DECLARE
#define PMIx_Init (*p_PMIx_Init)
#define PMIx_Get (*p_PMIx_Get)
#define PMIx_Put (*p_PMIx_Put)
#define PMIx_Commit (*p_PMIx_Commit)
#define PMIx_Fence (*p_PMIx_Fence)
#define PMIx_Finalize (*p_PMIx_Finalize)
#define PMIx_Abort (*p_PMIx_Abort)
#define PMIx_Error_string (*p_PMIx_Error_string)
#define PMIx_Info_load (*p_PMIx_Info_load)
#define PMIx_Value_destruct (*p_PMIx_Value_destruct)

static bool loaded;
static char load_error[512];

/* The status canopy_pmix_init returns when libpmix cannot be loaded;
 * canopy_pmix_load_error says why. */
#define CANOPY_PMIX_NOT_LOADED (-100000)

static int load(void)
{
    if (loaded)
        return 0;
    const char *names[] = {CANOPY_PMIX_LIBDIR "/libpmix.so.2", "libpmix.so.2", "libpmix.so"};
    void *h = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && h == NULL; i++)
        h = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
    if (h == NULL) {
        const char *e = dlerror();
        snprintf(load_error, sizeof load_error, "%s", e ? e : "libpmix.so.2 not found");
        return CANOPY_PMIX_NOT_LOADED;
    }
#define LOOKUP(f)                                                              \
    if ((p_##f = (__typeof__(p_##f))dlsym(h, #f)) == NULL) {                   \
        snprintf(load_error, sizeof load_error, "libpmix has no %s", #f);      \
        return CANOPY_PMIX_NOT_LOADED;                                         \
    }
    CANOPY_PMIX_FUNCS(LOOKUP)
#undef LOOKUP
    loaded = true;
    return 0;
}

const char *canopy_pmix_load_error(void)
{
    return load_error;
}

int canopy_pmix_not_loaded(void)
{
    return CANOPY_PMIX_NOT_LOADED;
}

static pmix_proc_t me;

int canopy_pmix_init(uint32_t *rank, uint32_t *size, char *nspace, size_t nlen)
{
    int lrc = load();
    if (lrc != 0)
        return lrc;
    pmix_status_t rc = PMIx_Init(&me, NULL, 0);
    if (rc != PMIX_SUCCESS)
        return rc;
    *rank = me.rank;
    pmix_proc_t wild;
    PMIX_PROC_CONSTRUCT(&wild);
    PMIX_LOAD_PROCID(&wild, me.nspace, PMIX_RANK_WILDCARD);
    pmix_value_t *val = NULL;
    rc = PMIx_Get(&wild, PMIX_JOB_SIZE, NULL, 0, &val);
    if (rc != PMIX_SUCCESS)
        return rc;
    if (val->type == PMIX_UINT32)
        *size = val->data.uint32;
    else
        rc = PMIX_ERR_BAD_PARAM;
    PMIX_VALUE_RELEASE(val);
    snprintf(nspace, nlen, "%s", me.nspace);
    return rc;
}

int canopy_pmix_put(const char *key, const char *value)
{
    if (!loaded)
        return CANOPY_PMIX_NOT_LOADED;
    pmix_value_t v;
    PMIX_VALUE_CONSTRUCT(&v);
    v.type = PMIX_STRING;
    v.data.string = (char *)value;
    /* PMIx_Put copies the value. */
    return PMIx_Put(PMIX_GLOBAL, key, &v);
}

int canopy_pmix_commit(void)
{
    if (!loaded)
        return CANOPY_PMIX_NOT_LOADED;
    return PMIx_Commit();
}

/* A fence over every process of the job, collecting the data put so far;
 * timeout_s 0 waits forever. */
int canopy_pmix_fence(int timeout_s)
{
    if (!loaded)
        return CANOPY_PMIX_NOT_LOADED;
    pmix_info_t info[2];
    bool collect = true;
    PMIX_INFO_LOAD(&info[0], PMIX_COLLECT_DATA, &collect, PMIX_BOOL);
    PMIX_INFO_LOAD(&info[1], PMIX_TIMEOUT, &timeout_s, PMIX_INT);
    pmix_status_t rc = PMIx_Fence(NULL, 0, info, 2);
    PMIX_INFO_DESTRUCT(&info[0]);
    PMIX_INFO_DESTRUCT(&info[1]);
    return rc;
}

/* -1000: the value is not a string; -1001: buf is too small. */
int canopy_pmix_get(uint32_t rank, const char *key, char *buf, size_t len)
{
    if (!loaded)
        return CANOPY_PMIX_NOT_LOADED;
    pmix_proc_t p;
    PMIX_PROC_CONSTRUCT(&p);
    PMIX_LOAD_PROCID(&p, me.nspace, rank);
    pmix_value_t *val = NULL;
    pmix_status_t rc = PMIx_Get(&p, key, NULL, 0, &val);
    if (rc != PMIX_SUCCESS)
        return rc;
    int out = 0;
    if (val->type != PMIX_STRING || val->data.string == NULL)
        out = -1000;
    else if (strlen(val->data.string) + 1 > len)
        out = -1001;
    else
        memcpy(buf, val->data.string, strlen(val->data.string) + 1);
    PMIX_VALUE_RELEASE(val);
    return out;
}

int canopy_pmix_finalize(void)
{
    if (!loaded)
        return CANOPY_PMIX_NOT_LOADED;
    return PMIx_Finalize(NULL, 0);
}

int canopy_pmix_abort(int code, const char *msg)
{
    if (!loaded)
        return CANOPY_PMIX_NOT_LOADED;
    return PMIx_Abort(code, msg, NULL, 0);
}

int canopy_pmix_not_found(void)
{
    return PMIX_ERR_NOT_FOUND;
}

int canopy_pmix_timeout(void)
{
    return PMIX_ERR_TIMEOUT;
}

const char *canopy_pmix_error(int rc)
{
    if (!loaded)
        return NULL;
    return PMIx_Error_string(rc);
}
