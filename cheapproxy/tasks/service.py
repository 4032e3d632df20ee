"""The task service: submit behind a hold, a durable poller with back-off and
a per-task deadline, compare-and-set finalisation, webhooks.

Lifecycle of a task row (``storage`` ``tasks`` table)::

    queued -> running -> finalizing -> succeeded | failed

* Submit holds the estimated maximum cost, writes the row (``queued``, no
  provider id yet), submits upstream, then records the provider's task id.
* The poller reads due rows from storage (so a restart resumes every
  unfinished task), polls the provider and reschedules with back-off.
* Finalisation is two compare-and-set steps on ``state``: the poller that
  moves ``queued``/``running`` -> ``finalizing`` (storing the outcome and the
  usage to bill) is the only one that goes on; it settles or releases the hold
  (exactly once: storage finishes a hold once), then moves ``finalizing`` ->
  ``succeeded``/``failed`` with the cost.  A crash in between leaves
  ``finalizing``, which the next poller completes; the hold of a task in that
  state is never taken by the stale-hold sweeper.
* Provider ``cancelled`` and ``failed``, a task the provider forgot, a submit
  that never completed and a passed deadline all end ``failed``, at no cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import secrets
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from .. import ir
from ..billing import Hold, format_usd
from ..errors import ProxyError, StartupError, UpstreamError
from ..events import CallFinished, UpstreamFailed
from ..logging import add_secret
from ..pipeline import breaker_failed
from ..pricing import MAX_TOKENS
from ..storage.base import KeyRecord, UsageRecord
from ..storage.records import TaskRecord
from ..upstream import counts_against
from .base import TaskEstimate, TaskNotFound, TaskProvider, TaskSpec, TaskStatus
from .images import upstream_image_mode
from .objects import FINALIZING, task_json
from .webhook import UnsafeURL, WebhookSender, check_url, resolve_problem

if TYPE_CHECKING:
    from ..app import Proxy
    from ..catalog import Catalog, Model, Upstream
    from ..config import TasksConfig

log = structlog.get_logger("cheapproxy.tasks")
UTC = dt.timezone.utc
ACTIVE = ("queued", "running")
# what a task must report to be priced by a scheme (plugins may set ``task_unit``)
SCHEME_UNITS = {"per_token": "tokens", "per_second_by_resolution": "seconds"}


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


def new_task_id() -> str:
    return "task_" + secrets.token_hex(12)


def scheme_unit(scheme: Any) -> str | None:
    return getattr(scheme, "task_unit", None) or SCHEME_UNITS.get(getattr(scheme, "name", ""))


class _Fixed:
    """A stand-in scheme that holds or charges a fixed amount (the configured
    maximum hold, or the hold when a provider reported nothing to price)."""

    name = "fixed"

    def __init__(self, amount: Decimal) -> None:
        self.amount = amount

    def estimate_max(self, **_: Any) -> Decimal:
        return self.amount

    def cost(self, usage: ir.Usage, *, task: dict[str, Any] | None = None) -> Decimal:
        return self.amount


def validate_task_models(catalog: Catalog) -> None:
    """Refuse to start when a task model cannot be served or priced."""
    problems = []
    for m in catalog.models.values():
        kind, unit = m.config.kind, scheme_unit(m.scheme)
        if kind in ("chat", "embedding"):
            if unit == "seconds":
                problems.append(f"model {m.name!r} is a {kind} model priced per second; that scheme prices tasks only")
            continue
        for u in m.upstreams:
            p = u.provider
            if kind == "image" and upstream_image_mode(u, m.config.sent_name) == "sync":
                continue
            if not isinstance(p, TaskProvider) or kind not in p.task_kinds:
                problems.append(f"model {m.name!r} ({kind}) uses upstream {u.name!r}, whose provider type "
                                f"{u.config.provider!r} cannot run {kind} tasks")
            elif unit is not None and unit not in p.usage_units:
                problems.append(f"model {m.name!r} is priced by {unit} but provider type {u.config.provider!r} "
                                f"reports only {', '.join(sorted(p.usage_units))}")
    if problems:
        raise StartupError("; ".join(problems))


class TaskService:
    """Runs async tasks for one Proxy (``TaskService.of(proxy)``)."""

    def __init__(self, proxy: Proxy) -> None:
        from ..config import TasksConfig

        self.proxy = proxy
        self.config: TasksConfig = getattr(proxy.config, "tasks", None) or TasksConfig()
        c = self.config
        add_secret(c.webhook_secret)
        self.webhooks = WebhookSender(allow_private=c.webhook_allow_private, timeout_seconds=c.webhook_timeout_seconds,
                                      retries=c.webhook_retries, backoff_seconds=c.webhook_backoff_seconds,
                                      secret=c.webhook_secret)
        self._inflight: set[str] = set()  # task ids being polled by this process
        self._submitting: set[str] = set()  # task ids this process is submitting (not yet confirmed)
        self._hooks: set[str] = set()  # task ids whose webhook this process is delivering
        self._jobs: set[asyncio.Task[Any]] = set()  # polls
        self._hook_jobs: set[asyncio.Task[Any]] = set()  # webhook deliveries
        self._loop: asyncio.Task[Any] | None = None
        self._wake = asyncio.Event()

    @classmethod
    def of(cls, proxy: Proxy) -> TaskService:
        svc = getattr(proxy, "task_service", None)
        if svc is None:
            svc = cls(proxy)
            proxy.task_service = svc  # type: ignore[attr-defined]
        return svc

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        validate_task_models(self.proxy.catalog)
        if self.config.poller and self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._run())
            self._spawn(self._resume_webhooks(), webhook=True)

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop polling; polls under way get ``grace_seconds`` to finish
        (anything cut short is finished by the next start)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        # webhooks stop at once: an undelivered one is sent again by the next start
        for job in list(self._hook_jobs):
            job.cancel()
        if self._jobs:
            await asyncio.wait(list(self._jobs), timeout=grace_seconds)
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, *self._hook_jobs, return_exceptions=True)
        await self.webhooks.close()

    def _spawn(self, coro: Any, *, webhook: bool = False) -> asyncio.Task[Any]:
        job = asyncio.get_running_loop().create_task(coro)
        jobs = self._hook_jobs if webhook else self._jobs
        jobs.add(job)
        job.add_done_callback(jobs.discard)
        return job

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before the round: a submit during it wakes the next one
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the poller must survive a bad round
                log.exception("tasks.poll_round_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(self.config.poll_interval_seconds, 1.0))

    async def tick(self) -> int:
        """Start polls for every due task (bounded); returns how many started."""
        c = self.config
        room = c.poll_concurrency - len(self._inflight)
        if room <= 0:
            return 0
        due = await self.proxy.storage.list_tasks(due_before=utcnow(), limit=c.poll_batch)
        started = 0
        for task in due:
            if started >= room:
                break
            if task.id in self._inflight:
                continue
            self._inflight.add(task.id)
            self._spawn(self._guarded_poll(task))
            started += 1
        return started

    async def _guarded_poll(self, task: TaskRecord) -> None:
        try:
            await self.poll_once(task)
        except Exception:  # noqa: BLE001 - retried on a later round
            log.exception("tasks.poll_failed", task_id=task.id)
            with contextlib.suppress(Exception):
                await self._reschedule(task, task.attempts + 1)
        finally:
            self._inflight.discard(task.id)

    # ------------------------------------------------------------ submit

    def task_upstreams(self, model: Model, kind: str) -> list[Upstream]:
        return [u for u in model.upstreams if isinstance(u.provider, TaskProvider) and kind in u.provider.task_kinds]

    def hold_amount(self, scheme: Any, est: TaskEstimate, pricing: dict[str, Any]) -> Decimal:
        """The estimate of the task's cost, or ``hold_max_usd`` when the
        estimate lacks what the model's price needs (e.g. ``duration: -1``)."""
        unit = scheme_unit(scheme)
        if (unit == "tokens" and est.tokens is None) or (unit == "seconds" and est.seconds is None):
            return self.config.hold_max_usd
        try:
            return Decimal(scheme.estimate_max(input_tokens=0, max_output_tokens=min(est.tokens or 0, MAX_TOKENS),
                                               task=pricing))
        except (ValueError, ArithmeticError):
            return self.config.hold_max_usd

    async def submit(self, *, key: KeyRecord, model: Model, kind: str, body: dict[str, Any]) -> TaskRecord:
        """Validate, hold, record and submit a task; returns its row (queued)."""
        ups = self.task_upstreams(model, kind)
        if not ups:
            raise ProxyError("invalid_request", f"Model '{model.name}' cannot run {kind} tasks.", param="model")
        provider: TaskProvider = ups[0].provider  # type: ignore[assignment]
        spec = provider.build_spec(body, kind=kind, model=model.name, upstream_model=model.config.sent_name)
        callback = await self._callback_url(body.get("callback_url"))
        est = provider.estimate(spec)
        pricing = {"kind": kind, "duration": est.seconds, "resolution": est.resolution, "size": est.size,
                   "tokens": est.tokens}
        check = getattr(model.scheme, "check_task", None)
        if check is not None:
            try:
                check(pricing)
            except ValueError as exc:
                raise ProxyError("invalid_request", f"{str(exc)[:1].upper()}{str(exc)[1:]}.", param="resolution") from None
        task_id = new_task_id()
        self._submitting.add(task_id)
        try:
            hold = await self._reserve(task_id, key, self.hold_amount(model.scheme, est, pricing), kind)
            now = utcnow()
            up = ups[0]
            grace = up.config.connect_timeout + up.config.first_byte_timeout + 5
            task = TaskRecord(
                id=task_id, user_id=key.user_id, key_id=key.id, model=model.name, upstream=up.name, kind=kind,
                state="queued", hold_id=hold.id, callback_url=callback, created_at=now, updated_at=now,
                request={"spec": spec.to_json(), "hold_usd": str(hold.amount),
                         "estimate": {"tokens": est.tokens, "seconds": est.seconds, "resolution": est.resolution,
                                      "size": est.size}},
                deadline_at=now + dt.timedelta(seconds=self.config.deadline_seconds),
                # until the provider confirms, the poller leaves the row alone (then: an interrupted submit)
                next_poll_at=now + dt.timedelta(seconds=grace),
            )
            try:
                await self.proxy.storage.create_task(task)
            except BaseException:
                await self.proxy.billing.release(hold)
                raise
            try:
                provider_id, up = await self._submit_upstream(ups, body, kind, model)
            except ProxyError as err:
                await self._finalize(task, "failed", error=("submit_failed", err.message), http_status=err.status)
                raise
            fields = {"provider_task_id": provider_id, "upstream": up.name,
                      "next_poll_at": utcnow() + dt.timedelta(seconds=self.config.poll_interval_seconds)}
            if not await self.proxy.storage.update_task(task_id, expect_state="queued", **fields):
                # finalised meanwhile (its deadline passed while the provider took its time)
                raise UpstreamError("upstream_timeout", f"upstream {up.name!r} confirmed the task too late")
            self._wake.set()
            log.info("task.submitted", task_id=task_id, model=model.name, upstream=up.name, kind=kind,
                     hold=str(hold.amount))
            return attrs.evolve(task, **fields)
        finally:
            self._submitting.discard(task_id)

    async def _callback_url(self, value: Any) -> str | None:
        if value is None:
            return None
        allow = self.config.webhook_allow_private
        try:
            url = check_url(value, allow_private=allow)
        except UnsafeURL as exc:
            raise ProxyError("invalid_request", f"callback_url {exc}.", param="callback_url") from None
        problem = None if allow else await resolve_problem(url)
        if problem:
            raise ProxyError("invalid_request", f"callback_url points at {problem}.", param="callback_url")
        return url

    async def _reserve(self, task_id: str, key: KeyRecord, amount: Decimal, kind: str) -> Hold:
        try:
            return await self.proxy.billing.reserve(
                request_id=task_id, user_id=key.user_id, key=key, scheme=_Fixed(amount),  # type: ignore[arg-type]
                input_tokens_estimate=0, max_output_tokens=0, task={"kind": kind})
        except ProxyError as err:
            if err.kind != "insufficient_balance" or err.code == "key_spend_cap":
                raise
            user = await self.proxy.storage.get_user_by_id(key.user_id)
            avail = max(user.balance - user.held, Decimal(0)) if user is not None else Decimal(0)
            raise ProxyError(
                "insufficient_balance",
                f"Insufficient balance: this {kind} task may cost up to ${format_usd(amount)} (held until it finishes, "
                f"charged only if it succeeds) but the available balance is ${format_usd(avail)}. Top up the balance, "
                "or ask for a shorter duration or a lower resolution.", code="insufficient_balance") from None

    async def _submit_upstream(self, ups: list[Upstream], body: dict[str, Any], kind: str,
                               model: Model) -> tuple[str, Upstream]:
        """Submit to the first upstream that accepts; a retryable failure
        (connection, 5xx, 429) moves on to the next (ordered fallbacks).  As
        for chat requests, an upstream cooling down after failures is tried
        last, a submit takes one of the upstream's ``max_connections`` (503
        when none frees within ``pool_timeout_seconds``), and its outcome
        counts for the upstream's circuit breaker."""
        last: ProxyError | None = None
        for up in self._by_health(ups):
            provider: TaskProvider = up.provider  # type: ignore[assignment]
            spec = provider.build_spec(body, kind=kind, model=model.name, upstream_model=model.config.sent_name)
            try:
                async with self._upstream_call(up, model.name):
                    async with asyncio.timeout(up.config.connect_timeout + up.config.first_byte_timeout):
                        pid = await provider.submit(self._session(up), spec)
                    if not isinstance(pid, str) or not pid:
                        raise UpstreamError("upstream_failed", f"upstream {up.name!r} returned no task id")
                return pid, up
            except TimeoutError:
                last = UpstreamError("upstream_timeout", f"upstream {up.name!r} did not accept the task in time",
                                     retryable=True)
            except UpstreamError as err:
                last = err
                if not err.retryable:
                    raise
        assert last is not None
        raise last

    def _by_health(self, ups: list[Upstream]) -> list[Upstream]:
        """``ups`` in their order, those cooling down left out -- unless all
        are, then all of them, soonest readmitted first (as chat routing)."""
        clients = self.proxy.clients
        now = time.monotonic()
        ready = [u for u in ups if u.name not in clients or clients[u.name].breaker.available(now)]
        return ready or sorted(ups, key=lambda u: clients[u.name].breaker.until)

    @contextlib.asynccontextmanager
    async def _upstream_call(self, up: Upstream, model: str) -> AsyncIterator[None]:
        """One call to a task upstream: a connection slot held throughout,
        and its outcome reported to the breaker (a timeout, a connection
        failure, a 5xx or a refused credential count against it; the
        provider's answer about a task, even "not found", is a success)."""
        client = self.proxy.clients.get(up.name)
        if client is None:
            yield
            return
        await client._acquire(None)
        try:
            yield
        except TimeoutError:
            breaker_failed(self.proxy, client)
            raise
        except UpstreamError as err:
            self.proxy.emit(UpstreamFailed(upstream=up.name, model=model, kind=err.kind,
                                           upstream_status=err.upstream_status))
            if counts_against(err):
                breaker_failed(self.proxy, client)
            raise
        except TaskNotFound:
            client.breaker.success()
            raise
        else:
            client.breaker.success()
        finally:
            client.free_slot()

    def _session(self, up: Upstream) -> Any:
        client = self.proxy.clients.get(up.name)
        return client.session if client is not None else None

    # ------------------------------------------------------------ polling

    def poll_delay(self, attempts: int) -> float:
        c = self.config
        base = c.poll_interval_seconds * c.poll_backoff ** max(0, min(attempts, 60))
        return min(c.max_poll_interval_seconds, base) * random.uniform(0.9, 1.1)

    async def _reschedule(self, task: TaskRecord, attempts: int, state: str | None = None) -> bool:
        nxt = utcnow() + dt.timedelta(seconds=self.poll_delay(attempts))
        fields: dict[str, Any] = {"attempts": attempts, "next_poll_at": nxt}
        if state is not None and state != task.state:
            fields["state"] = state
        return await self.proxy.storage.update_task(task.id, expect_state=task.state, **fields)

    async def poll_once(self, task: TaskRecord) -> str:
        """Advance one task by one step (poll, reschedule or finalise);
        returns the state it is left in as far as this caller knows."""
        if task.state == FINALIZING:
            return await self._complete(task)
        if task.state not in ACTIVE:
            return task.state
        up = self.proxy.catalog.upstreams.get(task.upstream or "")
        model = self.proxy.catalog.models.get(task.model)
        if up is None or model is None or not isinstance(up.provider, TaskProvider):
            return await self._finalize(task, "failed", error=(
                "not_configured", "The model or upstream of this task is no longer configured."))
        expired = task.deadline_at is not None and utcnow() >= task.deadline_at
        if task.provider_task_id is None:
            if task.id in self._submitting and not expired:
                return task.state
            return await self._finalize(task, "failed", error=(
                "submit_interrupted", "The provider never confirmed this task (the gateway stopped while submitting it)."))
        try:
            async with self._upstream_call(up, task.model):
                async with asyncio.timeout(up.config.connect_timeout + up.config.first_byte_timeout):
                    status = await up.provider.poll(self._session(up), task.provider_task_id)
        except TaskNotFound:
            return await self._finalize(task, "failed", error=("provider_lost_task", "The provider no longer knows this task."))
        except Exception as exc:  # noqa: BLE001 - transient until the deadline
            if expired:
                return await self._expire(task)
            log.warning("task.poll_error", task_id=task.id, upstream=up.name, error=str(exc)[:300])
            await self._reschedule(task, task.attempts + 1)
            return task.state
        if status.state == "succeeded":
            return await self._finalize(task, "succeeded", status=status, model=model, provider=up.provider)
        if status.state in ("failed", "cancelled"):
            code = status.error_code or ("cancelled" if status.state == "cancelled" else "task_failed")
            msg = status.error_message or ("The provider cancelled the task." if status.state == "cancelled"
                                           else "The provider reported that the task failed.")
            return await self._finalize(task, "failed", status=status, error=(code, msg))
        if expired:
            return await self._expire(task)
        if await self._reschedule(task, task.attempts + 1, state=status.state):
            return status.state
        return task.state

    async def _expire(self, task: TaskRecord) -> str:
        return await self._finalize(task, "failed", error=(
            "deadline_exceeded", f"The task did not finish within {self.config.deadline_seconds:g} seconds."))

    # ------------------------------------------------------------ finalisation

    def _billed(self, task: TaskRecord, status: TaskStatus, provider: TaskProvider, unit: str | None) -> dict[str, Any]:
        """What to bill, fixed when the outcome is claimed: the provider's
        reported usage, else its estimate of the output it reported."""
        spec = TaskSpec.from_json(task.request["spec"])
        asked = spec.duration if spec.duration is not None and spec.duration > 0 else provider.default_duration_seconds
        seconds = status.seconds or asked
        resolution = status.resolution or spec.resolution or provider.default_resolution
        size = status.size or spec.size or provider.default_size
        tokens = status.usage_tokens
        if tokens is None:
            tokens = provider.estimate(attrs.evolve(spec, duration=seconds, resolution=resolution, size=size)).tokens
        # "estimated" when the quantity the model is priced by was not reported by the provider
        reported = status.seconds if unit == "seconds" else status.usage_tokens
        return {"tokens": tokens, "seconds": seconds, "resolution": resolution, "size": size,
                "source": "provider" if reported is not None else "estimated"}

    async def _finalize(self, task: TaskRecord, outcome: str, *, status: TaskStatus | None = None,
                        error: tuple[str, str] | None = None, model: Model | None = None,
                        provider: TaskProvider | None = None, http_status: int | None = None) -> str:
        """Claim the outcome (CAS ``task.state`` -> finalizing) and complete it.
        Returns the state left; a lost race returns the caller's view."""
        result: dict[str, Any] = {"outcome": outcome}
        if status is not None:
            result.update(urls=list(status.result_urls), progress=status.progress,
                          proxied=bool(provider is not None and provider.content_proxied and not status.result_urls))
        if outcome == "succeeded" and status is not None and provider is not None:
            unit = scheme_unit(model.scheme) if model is not None else None
            result["billed"] = self._billed(task, status, provider, unit)
            result["progress"] = 100
        if error is not None:
            result["error_code"] = error[0]
        if http_status is not None:
            result["http_status"] = http_status
        fields: dict[str, Any] = {"state": FINALIZING, "result": result, "next_poll_at": utcnow()}
        if status is not None and status.usage is not None:
            fields["usage"] = status.usage
        if error is not None:
            fields["error"] = error[1][:1000]
        if not await self.proxy.storage.update_task(task.id, expect_state=task.state, **fields):
            return task.state  # another poller claimed it first: it does the billing
        return await self._complete(attrs.evolve(task, **fields))

    async def _complete(self, task: TaskRecord) -> str:
        """Settle or release the hold (exactly once, by storage), then CAS
        finalizing -> the outcome with the cost.  Safe to repeat."""
        result = task.result or {}
        outcome = result.get("outcome", "failed")
        hold = Hold(id=task.hold_id or "", request_id=task.id, user_id=task.user_id, key_id=task.key_id,
                    amount=Decimal(task.request.get("hold_usd", "0")), task=True)
        created = task.created_at or utcnow()
        record = UsageRecord(
            request_id=task.id, user_id=task.user_id, key_id=task.key_id, model=task.model, upstream=task.upstream,
            protocol=f"task-{task.kind}", streamed=False, status="ok" if outcome == "succeeded" else "error",
            http_status=200 if outcome == "succeeded" else int(result.get("http_status") or 0),
            latency_ms=max(0, int((utcnow() - created).total_seconds() * 1000)))
        model = self.proxy.catalog.models.get(task.model)
        usage: ir.Usage | None = None
        try:
            if outcome == "succeeded" and model is not None:
                billed = result.get("billed") or {}
                usage = ir.Usage(output_tokens=int(billed.get("tokens") or 0))
                record.output_tokens = usage.output_tokens
                record.usage_source = "estimated" if billed.get("source") == "estimated" else "upstream"
                pricing = {"kind": task.kind, "duration": billed.get("seconds"), "seconds": billed.get("seconds"),
                           "resolution": billed.get("resolution"), "size": billed.get("size"), "tokens": billed.get("tokens")}
                scheme: Any = model.scheme
                unit = scheme_unit(scheme)
                if (unit == "tokens" and billed.get("tokens") is None) or (unit == "seconds" and not billed.get("seconds")):
                    scheme, record.usage_source = _Fixed(hold.amount), "hold"  # nothing reported to price: the hold
                cost = await self.proxy.billing.settle(hold, scheme=scheme, usage=usage, record=record, task=pricing)
            else:
                if outcome == "succeeded":
                    log.error("task.unpriced", task_id=task.id, model=task.model)
                await self.proxy.billing.release(hold, record=record)
                cost = Decimal("0.00")
        except Exception:  # noqa: BLE001 - stays finalizing; the next round completes it
            log.exception("task.billing_failed", task_id=task.id)
            await self.proxy.storage.update_task(task.id, expect_state=FINALIZING,
                                                 next_poll_at=utcnow() + dt.timedelta(seconds=self.poll_delay(task.attempts)))
            return FINALIZING
        final = "succeeded" if outcome == "succeeded" else "failed"
        if not await self.proxy.storage.update_task(task.id, expect_state=FINALIZING, state=final, cost=cost,
                                                    next_poll_at=None):
            return final  # completed concurrently by another poller
        log.info("task.finished", task_id=task.id, state=final, cost=str(cost))
        done = attrs.evolve(task, state=final, cost=cost)
        self.proxy.emit(CallFinished(
            request_id=task.id, user_id=task.user_id, key_id=task.key_id, model=task.model, upstream=task.upstream,
            protocol=record.protocol, streamed=False, status=record.status, http_status=record.http_status,
            usage=usage, cost=cost, latency_seconds=record.latency_ms / 1000, ttft_seconds=None,
            attempts=task.attempts))
        if task.callback_url and task.id not in self._hooks:
            self._hooks.add(task.id)
            self._spawn(self._send_webhook(done), webhook=True)
        return final

    # ------------------------------------------------------------ webhooks

    async def _send_webhook(self, task: TaskRecord) -> None:
        try:
            payload = task_json(task, base_url=self.config.public_base_url)
            ok, attempts, outcome = await self.webhooks.deliver(task.callback_url or "", payload,
                                                                f"task.{payload['status']}")
            result = dict(task.result or {})
            result["webhook"] = {"state": "delivered" if ok else "failed", "attempts": attempts, "last": outcome}
            await self.proxy.storage.update_task(task.id, expect_state=task.state, result=result)
            log.info("task.webhook", task_id=task.id, delivered=ok, attempts=attempts, outcome=outcome)
        finally:
            self._hooks.discard(task.id)

    async def _resume_webhooks(self) -> None:
        """Deliver callbacks that a stop interrupted (recent finished tasks
        with a callback_url and no delivery outcome recorded)."""
        try:
            recent = await self.proxy.storage.list_tasks(limit=self.config.webhook_resume_scan)
        except Exception:  # noqa: BLE001
            log.exception("tasks.webhook_resume_failed")
            return
        for t in recent:
            if (t.state in ("succeeded", "failed") and t.callback_url and "webhook" not in (t.result or {})
                    and t.id not in self._hooks):
                self._hooks.add(t.id)
                self._spawn(self._send_webhook(t), webhook=True)

    # ------------------------------------------------------------ queries

    async def get_for(self, key: KeyRecord, task_id: str) -> TaskRecord:
        """The caller's own task, else 404 (another user's id looks unknown)."""
        task = await self.proxy.storage.get_task(task_id) if len(task_id) <= 100 else None
        if task is None or task.user_id != key.user_id:
            raise ProxyError("not_found", f"No task '{task_id[:100]}' was found for this API key's user.",
                             param="task_id", code="task_not_found")
        return task

    async def wait_finished(self, task_id: str, *, timeout_seconds: float = 10.0) -> TaskRecord:
        """Poll storage until the task is final (tests, CLI helpers)."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            task = await self.proxy.storage.get_task(task_id)
            if task is not None and task.state in ("succeeded", "failed"):
                return task
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {task.state if task else 'missing'}")
            self._wake.set()
            await asyncio.sleep(0.01)
