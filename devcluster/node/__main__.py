"""``python -m devcluster.node CONFIG.json``: the process node's agent (started by the cluster)."""

import asyncio
import logging
import sys

from devcluster.node.agent import Agent
from devcluster.node.config import NodeConfig

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
asyncio.run(Agent(NodeConfig.load(sys.argv[1])).main())
