"""The admins' routes: the keys (GET /v1/keys), the audit trail (GET /v1/audit, GET /v1/audit/verify) and the
Prometheus metrics (GET /metrics)."""

from ..deps import typed


def router():
    """The APIRouter of the admin routes; each needs a key of role admin."""
    from fastapi import APIRouter
    from fastapi.responses import Response
    from pydantic import BaseModel

    t = typed()

    class Rows(BaseModel):
        data: list[dict]  # keys (auth.Keys.list) or audit rows (audit.Audit.tail), as the CLI shows them

    class Head(BaseModel):
        seq: int
        hash: str

    class Verified(BaseModel):
        ok: bool
        rows: int
        problems: list[str]
        head: Head  # keep it outside the database: docs/audit.md

    r = APIRouter(tags=["admin"], default_response_class=t.JSON)

    @r.get("/v1/keys", response_model=Rows)
    async def list_keys(_: t.AdminKey, svc: t.ServiceDep):
        return {"data": svc.keys.list()}

    @r.get("/v1/audit", response_model=Rows)
    async def audit_tail(_: t.AdminKey, svc: t.ServiceDep, n: int = 50):
        return {"data": svc.audit.tail(max(1, min(n, 1000)))}

    @r.get("/v1/audit/verify", response_model=Verified)
    async def audit_verify(_: t.AdminKey, svc: t.ServiceDep):
        result = svc.audit.verify()
        head = {"seq": result.last_seq, "hash": result.last_hash}
        return {"ok": result.ok, "rows": result.rows, "problems": result.problems, "head": head}

    @r.get("/metrics", response_class=Response)
    async def metrics(_: t.AdminKey, svc: t.ServiceDep):
        body, content_type = svc.metrics.render()
        return Response(body, media_type=content_type)

    return r
