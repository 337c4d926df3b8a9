"""The Symphony benchmark's other contender: an echo bot on symphony-bdk-python (the FINOS
BDK), doing what patchbay's symphony channel does — sign in, read datafeed v2, and answer
every IM with "echo: <text>" in MessageML — through the same proxy to the same fake pod.

python3 scripts/bench-symphony-bdk.py POD_PORT PROXY_PORT PROXY_USER PROXY_PASSWORD KEY_PATH
"""
import asyncio
import json
import sys
from xml.sax.saxutils import escape

from symphony.bdk.core.config.loader import BdkConfigLoader
from symphony.bdk.core.service.datafeed.real_time_event_listener import RealTimeEventListener
from symphony.bdk.core.service.message.message_parser import get_text_content_from_message
from symphony.bdk.core.symphony_bdk import SymphonyBdk

pod_port, proxy_port, user, password, key = sys.argv[1:6]
config = BdkConfigLoader.load_from_content(json.dumps({
    "host": "127.0.0.1", "port": int(pod_port), "scheme": "http",
    "proxy": {"host": "127.0.0.1", "port": int(proxy_port), "username": user, "password": password},
    "bot": {"username": "bench-bot", "privateKey": {"path": key}},
    "datafeed": {"version": "v2"},
}))


class Echo(RealTimeEventListener):
    def __init__(self, messages):
        self.messages = messages

    async def on_message_sent(self, initiator, event):
        text = get_text_content_from_message(event.message)
        await self.messages.send_message(event.message.stream.stream_id, f"<messageML>echo: {escape(text)}</messageML>")


async def main():
    async with SymphonyBdk(config) as bdk:
        bdk.datafeed().subscribe(Echo(bdk.messages()))
        await bdk.datafeed().start()

asyncio.run(main())
