-- Argo CD health check for virtkube's kinds (Domain, Volume, Network, StoragePool,
-- HypervisorNode). Argo CD runs it with `obj` set to the resource and reads hs.status
-- (Healthy, Progressing, Degraded) and hs.message. Plain Lua 5.1 (Argo CD's gopher-lua).
--
--   Healthy      Ready=True, and the agent has seen the current generation
--   Progressing  no status yet; not placed on a node yet (the cluster controller's
--                Scheduled=False says why); the generation not observed yet; a move pending
--                or running (or handed over, the target not converged yet); Ready=False (or
--                Unknown) with a reason the agent retries on its own
--   Degraded     Ready=False with a reason only a human fixes (below); a Domain whose node
--                went silent (the controller's NodeUnreachable=True: nothing is started
--                elsewhere until the node returns or is fenced); a HypervisorNode that is
--                not Ready (its agent cannot reach libvirt, or its heartbeat is stale:
--                nothing can be placed there)
--
-- The terminal reasons are the ones the node agent writes for a spec that cannot be realized
-- (controller/src/agent: InvalidSpec from validation; NameConflict, Forbidden,
-- InvalidReference from the planner's notices; HostPathRefused, NotOwned, LibvirtRefused,
-- Invalid, MigrationTargetUnknown from converging; Unsupported for a volume its pool's
-- backend cannot hold; ImageMissing for a volume handed over without its copy; MigrationFailed for a Domain whose
-- requested move failed: it runs, but not where spec.nodeName asks, until the
-- controller's retry succeeds or someone looks). Networks and StoragePools summarize
-- their nodes as NotActiveEverywhere: the reason of each node is the first word of its
-- status.nodes[].message.
-- PartitionMissing, PartitionReplaced, AdoptMissing, PartitionRecordedTwice,
-- PartitionNumberRecorded for a disk-pool Volume whose partition record needs a human
-- (controller/src/agent/partition.rs).
local terminal = {
  InvalidSpec = true,
  NameConflict = true,
  Forbidden = true,
  InvalidReference = true,
  HostPathRefused = true,
  NotOwned = true,
  LibvirtRefused = true,
  Invalid = true,
  MigrationTargetUnknown = true,
  MigrationFailed = true,
  ImageMissing = true,
  Unsupported = true,
  PartitionMissing = true,
  PartitionReplaced = true,
  AdoptMissing = true,
  PartitionRecordedTwice = true,
  PartitionNumberRecorded = true,
}

local hs = {}

local function find_condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the virtkube agent to report status"
  return hs
end

-- Written by the cluster controller: the domain's node is silent. Whatever the agent last
-- wrote may no longer be true.
local unreachable = find_condition(status, "NodeUnreachable")
if unreachable ~= nil and unreachable.status == "True" then
  hs.status = "Degraded"
  hs.message = "NodeUnreachable: " .. (unreachable.message or unreachable.reason or "")
  return hs
end

local ready = find_condition(status, "Ready")
if ready == nil then
  hs.status = "Progressing"
  local scheduled = find_condition(status, "Scheduled")
  if scheduled ~= nil and scheduled.status == "False" then
    hs.message = "Not placed on a node yet: " .. (scheduled.reason or "") .. ": " .. (scheduled.message or "")
  else
    hs.message = "Waiting for the Ready condition"
  end
  return hs
end

-- The generation the agent acted on: status.observedGeneration, or (per-node kinds, whose
-- status every node writes a part of) the Ready condition's own.
local observed = status.observedGeneration
if observed == nil then
  observed = ready.observedGeneration
end
local generation = obj.metadata.generation
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the agent to act on generation " .. generation .. " (last seen " .. observed .. ")"
  return hs
end

local migration = status.migration
if status.phase == "Migrating" or (migration ~= nil and (migration.state == "Pending" or migration.state == "Running")) then
  hs.status = "Progressing"
  local from = (migration ~= nil and migration.sourceNode) or "?"
  local to = (migration ~= nil and migration.targetNode) or "?"
  hs.message = "Live migration from " .. from .. " to " .. to
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or ready.reason
  return hs
end

if obj.kind == "HypervisorNode" or terminal[ready.reason] then
  hs.status = "Degraded"
  hs.message = ready.reason .. ": " .. (ready.message or "")
  return hs
end

if status.nodes ~= nil then
  for _, node in ipairs(status.nodes) do
    local reason = node.message and string.match(node.message, "^(%a+):")
    if reason ~= nil and terminal[reason] then
      hs.status = "Degraded"
      hs.message = node.nodeName .. ": " .. node.message
      return hs
    end
  end
end

hs.status = "Progressing"
hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
return hs
