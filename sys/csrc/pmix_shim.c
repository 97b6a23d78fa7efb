/* Canopy's PMIx shim: the six PMIx client calls a broker needs, with plain
 * C types at the boundary so that the Rust side declares no PMIx struct.
 * Built only when libpmix's headers are found (see build.rs). */
#include <pmix.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static pmix_proc_t me;

int canopy_pmix_init(uint32_t *rank, uint32_t *size, char *nspace, size_t nlen)
{
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
    pmix_value_t v;
    PMIX_VALUE_CONSTRUCT(&v);
    v.type = PMIX_STRING;
    v.data.string = (char *)value;
    /* PMIx_Put copies the value. */
    return PMIx_Put(PMIX_GLOBAL, key, &v);
}

int canopy_pmix_commit(void)
{
    return PMIx_Commit();
}

/* A fence over every process of the job, collecting the data put so far;
 * timeout_s 0 waits forever. */
int canopy_pmix_fence(int timeout_s)
{
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
    return PMIx_Finalize(NULL, 0);
}

int canopy_pmix_abort(int code, const char *msg)
{
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
    return PMIx_Error_string(rc);
}
