-- Argo CD health check for dualpath.io/DualPathCluster (Lua 5.1, Argo CD's sandbox: base and table only).
-- Order: no status or an unobserved spec generation -> Progressing; Degraded=True -> Degraded;
-- Ready=True -> Healthy (Rebalancing and TelemetryAvailable=False only annotate the message: the cluster
-- serves while it rebalances or holds on missing telemetry); otherwise Progressing with the operator's reason.
local hs = { status = "Progressing", message = "Waiting for the operator to report status" }

local function describe(c, fallback)
  if c == nil then return fallback end
  if c.message ~= nil and c.message ~= "" then return c.message end
  if c.reason ~= nil and c.reason ~= "" then return c.reason end
  return fallback
end

if obj.status == nil then
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Spec generation " .. tostring(generation) .. " not yet observed by the operator"
  return hs
end

local conditions = {}
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type ~= nil then conditions[c.type] = c end
  end
end

local degraded = conditions["Degraded"]
if degraded ~= nil and degraded.status == "True" then
  return { status = "Degraded", message = describe(degraded, "Degraded") }
end

local ready = conditions["Ready"]
if ready ~= nil and ready.status == "True" then
  local message = describe(ready, "Ready")
  local rebalancing = conditions["Rebalancing"]
  if rebalancing ~= nil and rebalancing.status == "True" then
    message = message .. "; rebalancing: " .. describe(rebalancing, "in progress")
  end
  local telemetry = conditions["TelemetryAvailable"]
  if telemetry ~= nil and telemetry.status == "False" then
    message = message .. "; telemetry unavailable, rebalancing on hold: " .. describe(telemetry, "no data")
  end
  return { status = "Healthy", message = message }
end

local progressing = conditions["Progressing"]
if progressing ~= nil and progressing.status == "True" then
  hs.message = describe(progressing, hs.message)
elseif ready ~= nil then
  hs.message = describe(ready, hs.message)
end
return hs
