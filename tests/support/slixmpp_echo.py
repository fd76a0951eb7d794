"""A real third-party XEP-0114 component: slixmpp's ComponentXMPP, run as its
own process.  It answers every message with "echo: <body>" and every ping
with a result, and prints READY once the gateway accepted its handshake.

    python -m tests.support.slixmpp_echo JID SECRET HOST PORT
"""

import sys

import slixmpp


class Echo(slixmpp.ComponentXMPP):
    def __init__(self, jid, secret, host, port):
        super().__init__(jid, secret, host, int(port))
        self.register_plugin("xep_0199")  # answers pings
        self.add_event_handler("session_start", self.started)
        self.add_event_handler("message", self.on_message)

    def started(self, event):
        print("READY", flush=True)

    def on_message(self, msg):
        if msg["type"] in ("chat", "normal"):
            reply = msg.reply(f"echo: {msg['body']}")
            reply["id"] = f"echo-{msg['id']}"
            reply.send()


def main():
    jid, secret, host, port = sys.argv[1:5]
    xmpp = Echo(jid, secret, host, port)
    xmpp.connect()
    xmpp.loop.call_later(60, xmpp.disconnect)  # bounded: a test never needs longer
    xmpp.loop.run_until_complete(xmpp.disconnected)


if __name__ == "__main__":
    main()
