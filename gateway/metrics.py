"""Prometheus metrics of one gateway: requests by route and status, latency, projection lag.

Each application has its own registry, so several gateways in one process (tests,
``ucloud up``) do not collide on metric names.
"""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ucloud_gateway_requests", "HTTP requests answered, by method, route and status",
            ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "ucloud_gateway_request_duration_seconds", "Time to answer an HTTP request, by method and route",
            ["method", "route"], registry=self.registry)
        self.lag = Gauge(
            "ucloud_projection_lag_events", "Events in the log that the gateway's read models have not applied yet",
            registry=self.registry)
        self.position = Gauge(
            "ucloud_projection_position", "Log position the gateway's read models have reached",
            registry=self.registry)
        self.snapshot_failures = Gauge(
            "ucloud_projection_snapshot_failures",
            "Snapshots of the gateway's read models that failed to save or read since it started",
            registry=self.registry)

    def middleware(self) -> Middleware:
        @web.middleware
        async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as error:
                status = error.status
                raise
            finally:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                self.requests.labels(request.method, route, str(status)).inc()
                self.latency.labels(request.method, route).observe(time.perf_counter() - started)

        return metrics_middleware
