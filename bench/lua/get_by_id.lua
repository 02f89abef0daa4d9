-- GET <prefix><random id>, ids read from the file given as the first script argument.
local ids = {}
local prefix = "/"
function init(args)
  for line in io.lines(args[1]) do ids[#ids + 1] = line end
  prefix = args[2]
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end
function request()
  return wrk.format("GET", prefix .. ids[math.random(#ids)])
end
