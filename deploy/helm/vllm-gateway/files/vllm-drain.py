"""vLLM's preStop hook: take this pod out of every gateway, then wait for what it holds to end.

1. With an admin key (DRAIN_ADMIN_KEYS, the gateway's VLLM_ADMIN_API_KEYS), POST
   /admin/backends/drain {"url": this pod} to each gateway pod (GATEWAY_PODS, a headless Service):
   the gateway that answers sends the pod nothing new at once. Each call is bounded (2 s); a
   failure is printed and the hook goes on.
2. Wait DRAIN_SECONDS: the pod has left its headless Service's DNS records, so every gateway
   worker drains it within the records' TTL and its re-resolution; its requests then finish here,
   or at the gateway's drain deadline move on to another pod. Then vLLM gets SIGTERM.

Only the standard library: it runs with vLLM image's python3.
"""

import json
import os
import socket
import time
import urllib.request


def main() -> None:
    ip = os.environ["POD_IP"]
    pod = f"http://{f'[{ip}]' if ':' in ip else ip}:{os.environ['VLLM_PORT']}"
    keys = os.environ.get("DRAIN_ADMIN_KEYS", "")
    key = keys.split(",")[0].split(":")[0].strip()
    gateways = os.environ.get("GATEWAY_PODS", "")
    if key and gateways:
        name, _, port = gateways.rpartition(":")
        try:
            found = socket.getaddrinfo(name, int(port), proto=socket.IPPROTO_TCP)
            addresses = sorted({str(a[4][0]) for a in found})
        except OSError as exc:
            print(f"drain: {name} does not resolve ({exc}); the pod leaves through DNS only")
            addresses = []
        for address in addresses:
            host = f"[{address}]" if ":" in address else address
            request = urllib.request.Request(
                f"http://{host}:{port}/admin/backends/drain",
                data=json.dumps({"url": pod}).encode(),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as answer:
                    print(f"drain: {pod} draining at gateway {address} ({answer.status})")
            except Exception as exc:  # a gateway that does not know the pod yet says 404
                print(f"drain: gateway {address}: {exc}")
    time.sleep(float(os.environ.get("DRAIN_SECONDS", "0")))


if __name__ == "__main__":
    main()
