"""Plain pipeline parallelism: one token at a time through every stage; no draft."""
from __future__ import annotations

from pipedec_sim.protocol.messages import Action, Row, Verified
from pipedec_sim.protocol.strategies.base import Strategy


class AR(Strategy):
    name = "ar"

    def start(self) -> list[Action]:
        rows = self.prompt_rows()
        self.last = rows[-1]
        return [self.inject(rows, "prefill", verify_from=len(rows) - 1, committed=len(rows))]

    def on_verified(self, event: Verified) -> list[Action]:
        x = event.tokens[self.last.id]
        actions = self.commit([x], 0, "token")
        if not self.done:
            self.last = Row(self.new_id(), self.last.id, x, self.last.pos + 1)
            actions.append(self.inject([self.last], "token", committed=1))
        return actions
