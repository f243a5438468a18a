-- wrk script for bench/serving.py and bench/voice.py: predicts against random heads, each
-- request with its head's tenant key. Arguments (after --): a folder holding targets.txt
-- ("head_id key" per line) and input<i>.bin / input<i>.b64, the inputs per request, "json"
-- (base64 in JSON) or "raw" (the bytes as the body; several as multipart files), the
-- inputs' kind ("image" or "audio": the JSON field and the form's) and media type.
local targets, images, encoded = {}, {}, {}
local per_request, body_kind, kind, media
local boundary = "graft-bench-3f9c1d0e"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  local folder = args[1]
  per_request, body_kind = tonumber(args[2]), args[3]
  kind, media = args[4] or "image", args[5] or "image/jpeg"
  for line in io.lines(folder .. "/targets.txt") do
    local id, key = line:match("(%S+) (%S+)")
    targets[#targets + 1] = { "/v1/heads/" .. id .. "/predict", "Bearer " .. key }
  end
  local i = 0
  while true do
    local data = read(folder .. "/input" .. i .. ".bin")
    if not data then break end
    images[#images + 1] = data
    encoded[#encoded + 1] = read(folder .. "/input" .. i .. ".b64")
    i = i + 1
  end
end

function request()
  local target = targets[math.random(#targets)]
  local headers = { ["Authorization"] = target[2] }
  local parts = {}
  if body_kind == "json" then
    for k = 1, per_request do
      parts[k] = '{"' .. kind .. '":"' .. encoded[math.random(#encoded)] .. '"}'
    end
    headers["Content-Type"] = "application/json"
    return wrk.format("POST", target[1], headers, '{"inputs":[' .. table.concat(parts, ",") .. "]}")
  end
  if per_request == 1 then
    headers["Content-Type"] = media
    return wrk.format("POST", target[1], headers, images[math.random(#images)])
  end
  for k = 1, per_request do
    parts[k] = "--" .. boundary .. '\r\nContent-Disposition: form-data; name="' .. kind
      .. '"; filename="' .. k .. '"\r\nContent-Type: ' .. media .. "\r\n\r\n"
      .. images[math.random(#images)] .. "\r\n"
  end
  headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  return wrk.format("POST", target[1], headers, table.concat(parts) .. "--" .. boundary .. "--\r\n")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "errors": %d, "p50_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6,
    e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
